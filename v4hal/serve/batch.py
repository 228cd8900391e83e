"""The forward batch and its page kinds, re-exported for the serving layer: the model owns them
(`v4hal.model.batch`), since its step reads them, and serving builds them."""
from v4hal.model.batch import *  # noqa: F401,F403
from v4hal.model.batch import __all__  # noqa: F401
