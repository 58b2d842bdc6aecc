"""``python -m fastortho.export export``: fastortho's task vectors as CLIPVisionModel folders
with a FusionBench model pool (``fastortho.hf.export_fusionbench``), and optionally their merged
model by any fastortho.merge method."""
from __future__ import annotations

from pathlib import Path


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastortho.export",
                                description="Export to FusionBench / Hugging Face: CLIPVisionModel folders and a "
                                            "model-pool YAML.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="pretrained + each task vector -> CLIPVisionModel folders + modelpool.yaml")
    e.add_argument("--model", default="ViT-B-32", help="open_clip model name of --weights (ignored for a CLIPModel "
                                                       "folder)")
    e.add_argument("--weights", required=True, help="the pretrained weights the vectors were taken against")
    e.add_argument("--pretrained", help="the open_clip pretrained tag of --weights (e.g. openai)")
    e.add_argument("--vectors", type=Path, required=True, help="folder of {task}.safetensors task vectors")
    e.add_argument("--alpha", type=float, default=1.0, help="scale of each vector (1: the fine-tuned model)")
    e.add_argument("--merge", help="also write the merged model of the vectors by this method (ta, ties, dare, tsvm, "
                                   "isoc, ...: fastortho.merge.METHODS) as the folder merged-<method>, outside the "
                                   "pool; needs --merge-alpha")
    e.add_argument("--merge-alpha", type=float, help="the merged model's coefficient (th0 + alpha * merged), e.g. the "
                                                     "alpha fastortho-eval --merge chose")
    e.add_argument("--out", type=Path, required=True, help="folder for the model folders and modelpool.yaml")
    e.add_argument("--overwrite", action="store_true", help="replace model folders that exist")
    return p


def main(argv=None) -> None:
    """``python -m fastortho.export export``: fastortho's task vectors applied to their pretrained
    model, written as CLIPVisionModel folders with a FusionBench model pool."""
    from .clip import load_clip
    from .hf import export_fusionbench
    from .task_vectors import TaskVector

    p = build_parser()
    args = p.parse_args(argv)
    if (args.merge is None) != (args.merge_alpha is None):
        raise SystemExit("python -m fastortho.export export: --merge and --merge-alpha go together (the method and "
                         "the coefficient of the merged model)")
    if args.merge is not None:
        from .merge import METHODS

        if args.merge not in METHODS:
            raise SystemExit(f"--merge: expected one of {', '.join(METHODS)}, got {args.merge!r}")
    files = sorted(args.vectors.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"--vectors: {args.vectors} holds no .safetensors task vectors")
    model, _, _ = load_clip(args.model, args.weights, pretrained=args.pretrained)
    vectors = {f.stem: TaskVector.load(f) for f in files}
    try:
        out = export_fusionbench(model.visual, vectors, args.out, alpha=args.alpha, overwrite=args.overwrite)
        if args.merge is not None:
            from .hf import encoder_to_hf, write_vision_folder
            from .merge import merge_vectors

            merged = merge_vectors(vectors, args.merge).apply_to(model.visual, args.merge_alpha)
            folder = write_vision_folder(out / f"merged-{args.merge}", *encoder_to_hf(merged), overwrite=args.overwrite)
            print(f"wrote the merged model ({args.merge}, alpha {args.merge_alpha:g}) to {folder}")
    except (ValueError, TypeError, FileExistsError) as err:
        raise SystemExit(f"python -m fastortho.export export: {err}") from None
    print(f"wrote {len(vectors) + 1} CLIPVisionModel folders and {out / 'modelpool.yaml'}")


if __name__ == "__main__":
    main()
