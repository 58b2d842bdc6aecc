"""The ops behind fastortho's public functions, one package per op (docs/design.md section 3):

- ``orthoreg/``  the dense OrthoReg penalty: torch / Triton / CUDA backends, measured choice,
                 FSDP2 sharding
- ``lora/``      the exact low-rank penalty of LoRA adapters: torch / Triton backends
- ``dual/``      the dual (primal + tangent) rules of a linearized model and their kernels
- ``_common.py`` precision of library products, backend resolution, shape grouping, and
                 ``ListOp`` (one autograd definition for a registered op and its eager path)
- ``cuda_ext.py`` building and loading the optional CUDA extension (``csrc/``)

Each op package's ``__init__.py`` is its dispatch and says which file holds what.
"""
