"""fedse ServerApp: ``flwr run .`` loads ``server.app:app``.

Run config (``pyproject.toml`` ``[tool.flwr.app.config]`` or ``flwr run . --run-config``):

* ``config-file``: YAML file, relative to the project root (default ``configs/quickstart.yaml``);
* ``overrides``: space-separated ``key=value`` overrides (``"server.rounds=3 partition.alpha=0.1"``);
* ``output-dir``: parent of the run folder (default ``runs``);
* ``resume-from``: a run folder to continue from its last checkpoint (its ``config.yaml`` plus ``overrides``).

The strategy, guard and report live in :mod:`fedse.server` and :mod:`fedse.strategy`.
"""

from dataclasses import replace
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedse.config import load_config
from fedse.federated import build_federated_data
from fedse.server import final_tables, run_server
from fedse.simulation import make_run_dir, write_partition

ROOT = Path(__file__).resolve().parents[1]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    overrides = str(rc.get("overrides", "")).split()
    resume = str(rc.get("resume-from", ""))
    if resume:
        run_dir = Path(resume)
        cfg = load_config(run_dir / "config.yaml", overrides)
        fed = build_federated_data(cfg)
    else:
        config_file = Path(str(rc.get("config-file", "configs/quickstart.yaml")))
        cfg = load_config(config_file if config_file.is_absolute() else ROOT / config_file, overrides)
        fed = build_federated_data(cfg)
        out = Path(str(rc.get("output-dir", cfg.output.dir)))
        cfg = replace(cfg, output=replace(cfg.output, dir=str(out if out.is_absolute() else ROOT / out)))
        run_dir = make_run_dir(cfg, config_file.stem)
    write_partition(fed, run_dir)
    outcome = run_server(grid, cfg, fed, run_dir, resume=bool(resume))
    print(final_tables(outcome.log))
    print(f"run folder: {run_dir}")
