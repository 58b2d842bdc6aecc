// The Python module stub of the ahead-of-time build (`fastortho._C`): importing it loads the
// shared library, whose TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL blocks register the ops.
#include <Python.h>

static struct PyModuleDef fastortho_c_module = {PyModuleDef_HEAD_INIT, "_C", "fastortho CUDA ops (registered in torch.ops.fastortho)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastortho_c_module); }
