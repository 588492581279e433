"""The driver's session: one connection to one `example:` endpoint."""

from componentize_py_types import Err
from wit_world.exports import driver as contract
from wit_world.imports import log, types


class Session(contract.Session):
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    @classmethod
    def open(cls, endpoint: str, credentials: types.Credentials) -> "Session":
        if not endpoint.startswith("example:"):
            raise Err(types.Error_InvalidArgument(f"{endpoint!r} is not an example: endpoint"))
        log.log(log.Level.INFO, f"connected to {endpoint}")
        return cls(endpoint)

    def host_info(self) -> types.HostInfo:
        return types.HostInfo(
            hostname=self.endpoint.removeprefix("example:"),
            hypervisor_kind="example",
            hypervisor_version="1.0",
            platform="amd64",
            cpu_model="example",
            physical_cpus=4,
            logical_cpus=4,
            main_memory_mib=8192,
            free_memory_mib=8192,
            allocated_logical_cpus=0,
            total_instances=1,
            used_instances=0,
        )

    def list_vms(self) -> list[types.VmInfo]:
        return [self.get_vm("vm-1")]

    def list_templates(self) -> list[types.VmInfo]:
        return []

    def get_vm(self, vm: str) -> types.VmInfo:
        if vm != "vm-1":
            raise Err(types.Error_NotFound(f"no VM {vm!r} on {self.endpoint}"))
        return types.VmInfo(
            id="vm-1",
            name="vm-1",
            state=types.VmState.STOPPED,
            host=self.endpoint,
            addresses=[],
            resources=types.VmResources(logical_cpus=1, main_memory_mib=512, disk_mib=None),
            platform="amd64",
            os_family="linux",
            os_name=None,
            is_template=False,
            labels=[],
        )

    def _unsupported(self, op: str):
        raise Err(types.Error_Unsupported(f"{op} is not implemented by this driver"))

    def create(self, profile):
        self._unsupported("create")

    def clone(self, source, name, linked):
        self._unsupported("clone")

    def start(self, vm):
        self._unsupported("start")

    def shutdown(self, vm, force):
        self._unsupported("shutdown")

    def suspend(self, vm):
        self._unsupported("suspend")

    def resume(self, vm):
        self._unsupported("resume")

    def migrate(self, vm, destination, live):
        self._unsupported("migrate")

    def destroy(self, vm):
        self._unsupported("destroy")

    def guest_agent_command(self, vm, command, timeout_ms):
        self._unsupported("guest-agent-command")
