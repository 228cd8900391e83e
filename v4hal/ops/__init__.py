"""Op declarations: one per op (schema, checks, fake impl, public wrapper). Importing this package
defines every ``torch.ops.v4hal.<op>``; ``OPS`` is the op table everything else reads."""
from ._define import OPS, OpDef, public_ops  # noqa: F401

# Importing the op modules defines the ops; their order is the declaration order of OPS and PUBLIC_OPS.
from . import quant, gemm, attention, moe, mhc, small, paged, paged_attention, paged_indexer, ragged_compress  # noqa: F401  # isort: skip

#: The public ops declared by v4hal itself, in declaration order (``public_ops()`` also lists ops
#: declared later, e.g. by a plugin).
PUBLIC_OPS = tuple(public_ops())
