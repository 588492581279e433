"""A gve driver in Python (componentize-py): the SDK template's driver, written
from wit/0.1 with another language's component tooling. It reports one host and
knows one VM. The session resource lives in driver.py (componentize-py looks
for an exported interface's resources in the module named after it)."""

from wit_world import exports
from wit_world.imports import types

VERSION = "0.1.0"


class Driver(exports.Driver):
    def info(self) -> types.DriverInfo:
        # Declare each operation as you implement it: the host refuses undeclared
        # ones before they reach the plugin. Reads need none.
        return types.DriverInfo(
            name="py-driver",
            version=VERSION,
            hypervisor_kind="example",
            capabilities=types.Capabilities(0),
        )
