"""The Ray mode: sessions on kernel hosts spread over a Ray cluster (docs/scale-out.md).

`open_ray_engine` is the way in, for the service and for Python code in the cluster alike;
`ray` is an optional extra, imported only by this package.
"""

from .engine import RayEngine, open_ray_engine, stop_hosts

__all__ = ["RayEngine", "open_ray_engine", "stop_hosts"]
