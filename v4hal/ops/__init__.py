"""Op declarations: one per op (schema, checks, fake impl, public wrapper). Importing this package
defines every ``torch.ops.v4hal.<op>``; ``OPS`` is the op table everything else reads."""
from v4hal.hal.packages import import_modules

from ._define import OPS, OpDef, public_ops  # noqa: F401

#: Modules of this package that declare no op: the generator of ``docs/op_contract.md`` reads the
#: ops (and runs as ``python -m v4hal.ops.contract``, so the package must not import it).
NOT_DECLARING = ("contract",)

# Importing the op modules (every public module here, sorted by name) defines the ops; that order
# is the declaration order of OPS and PUBLIC_OPS.
import_modules(__name__, exclude=NOT_DECLARING)

#: The public ops declared by v4hal itself, in declaration order (``public_ops()`` also lists ops
#: declared later, e.g. by a plugin).
PUBLIC_OPS = tuple(public_ops())
