"""nnlab's optional CPU kernels: C sources, one SIMD header, the build, and their torch.library ops.

Each kernel is a custom op with a fake implementation and a registered backward, so eager mode,
autograd and torch.compile all see one op, and each has one function that says where it applies:

    pool(x, relu)                    pool_applies(x)              2x2 max-pool (+ReLU), pool.c
    conv_pool(x, conv, relu)         conv_pool_applies(x, conv)   3x3 conv + 2x2 max-pool (+ReLU),
                                                                  conv_pool.c and winograd.c
    attention(qkv, n_head, causal)   attention_applies(qkv, ...)  self-attention, attention.c

The layers in nnlab.nn call an op only where its `*_applies` says yes, and torch's functional path
otherwise; models never name a kernel. Without a C compiler, or with NNLAB_NO_KERNELS=1, nothing
applies and only speed changes; `switched_off()` does the same inside a `with` block (for the ONNX
exporter). `status()` says whether the library is built and which ops run on this CPU; `used()`
names the kernels that ran in this process.
"""

from nnlab.kernels.attention_op import attention, attention_applies
from nnlab.kernels.build import status, switched_off, used
from nnlab.kernels.conv_pool_op import conv_pool, conv_pool_applies
from nnlab.kernels.pool_op import pool, pool_applies

__all__ = ["attention", "attention_applies", "conv_pool", "conv_pool_applies", "pool", "pool_applies", "status",
           "switched_off", "used"]
