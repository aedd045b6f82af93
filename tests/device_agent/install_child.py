"""A process that installs one image into a slot directory: the victim of the kill -9 test.

    python -m tests.device_agent.install_child SLOTS IMAGE UPDATE_ID PUBKEY_PEM

It recovers the store (as an agent does at start), prints "ready", installs with the host
backend's self-test and prints the outcome. Durability boundaries obey
TINYFLEET_AGENT_CRASH_AT / TINYFLEET_AGENT_BOUNDARIES (device_agent.durable).
"""

from __future__ import annotations

import sys
from pathlib import Path

from device_agent.backends import HostBackend, self_test
from device_agent.durable import crash_hook_from_env
from device_agent.profile import DeviceProfile
from device_agent.slots import SlotStore
from firmware.image import load_public_key


def main(argv: list[str]) -> int:
    """Recover, then install IMAGE as UPDATE_ID."""
    root, image, update_id, pub = Path(argv[0]), Path(argv[1]), argv[2], Path(argv[3])
    device = DeviceProfile.for_mcu("dev-1", "stm32f746", "host")
    backend = HostBackend(device)
    store = SlotStore(root, device, load_public_key(pub.read_bytes()), crash_hook_from_env())

    def check(slot_dir: Path, img: object) -> str | None:
        return self_test(backend, slot_dir, img)  # type: ignore[arg-type]

    store.recover(check)
    data = image.read_bytes()
    print("ready", flush=True)
    outcome = store.install(update_id, data, check)
    print(outcome.state.value, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
