"""The table lookups' kernels: the torch reference, the derivatives, the autograd and custom-op
ways in, the compiled CPU loops, Triton and the C++ CUDA operators, and `dispatch`, which alone
decides which of them runs a call. Imports nothing from ops.nn or ops.convert."""
