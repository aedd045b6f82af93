"""`tinyfleet-agent`: run one device from agent.toml, or simulate N devices in one process.

    tinyfleet-agent --config agent.toml
    tinyfleet-agent --simulate N --config-dir DIR    (DIR/*.toml, the first N, sorted)

With --simulate, a device whose data directory is empty gets its shifted slice of the
digits (firmware.data.device_slice, by its position). SIGTERM or SIGINT stops cleanly: work
in progress finishes, every device publishes its retained `offline` and disconnects.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig
from device_agent.durable import crash_hook_from_env
from device_agent.errors import AgentError
from device_agent.local_data import write_device_data
from device_agent.loop import AgentLoop


def _configs(args: argparse.Namespace) -> list[AgentConfig]:
    if args.simulate is None:
        if args.config is None:
            raise AgentError("give --config agent.toml (or --simulate N --config-dir DIR)")
        return [AgentConfig.load(Path(args.config))]
    if args.config_dir is None:
        raise AgentError("--simulate needs --config-dir DIR holding one agent.toml per device")
    files = sorted(Path(args.config_dir).glob("*.toml"))
    if len(files) < args.simulate:
        raise AgentError(f"--simulate {args.simulate}: {args.config_dir} holds only "
                         f"{len(files)} agent configs")
    configs = [AgentConfig.load(f) for f in files[:args.simulate]]
    hosts = {(c.broker_host, c.broker_port) for c in configs}
    if len(hosts) != 1:
        raise AgentError(f"simulated devices must share one broker, the configs name {hosts}")
    for index, config in enumerate(configs):
        if not config.data_dir.exists() or not any(config.data_dir.iterdir()):
            write_device_data(config.data_dir, index)
    return configs


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="tinyfleet-agent", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="agent.toml of the device")
    parser.add_argument("--simulate", type=int, metavar="N", help="run N devices")
    parser.add_argument("--config-dir", help="with --simulate: a directory of agent configs")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        configs = _configs(args)
        agents = [DeviceAgent(c, boundary=crash_hook_from_env()) for c in configs]
    except AgentError as exc:
        print(f"tinyfleet-agent: {exc}", file=sys.stderr)
        return 2
    loop = AgentLoop(configs[0].broker_host, configs[0].broker_port)
    loop.add(agents)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    loop.start()
    logging.getLogger(__name__).info("%d device(s) running against %s:%d", len(agents),
                                     configs[0].broker_host, configs[0].broker_port)
    stop.wait()
    loop.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
