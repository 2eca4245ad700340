"""tessera.shard: sharded units (api.py), the hooks that drive them (runtime.py), clipping and state dicts.

The package is also the public function: `tessera.shard(module, ...)` calls `tessera.shard.api.shard`, and
`import tessera.shard.api` still reaches the module (a plain function of the same name used to shadow the package).
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from tessera.shard.api import shard

        return shard(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
