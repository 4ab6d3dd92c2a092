"""``denoiselab experts CONFIG``: train a MEME expert set as parallel Ray Train runs (resumable)."""
from __future__ import annotations

from orchestrator.cli.common import add_config_args

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("experts", help="train a MEME expert set: one Ray Train run per interval, concurrently")
    add_config_args(p)
    p.add_argument("--address", help="Ray cluster: auto, ray://host:10001 or host:port (default: start local Ray)")
    p.set_defaults(handler=_cmd_experts)


def _cmd_experts(args) -> int:
    from orchestrator.infra.config_io import load_run_config
    from orchestrator.jobs.experts import ExpertsRequest, run_experts
    cfg = load_run_config(args.config, args.overrides)
    out = run_experts(ExpertsRequest(cfg, address=args.address))
    ui = out.tracking_uri if out.tracking_uri.startswith("http") else f"mlflow ui --backend-store-uri {out.tracking_uri}"
    print(f"\nexpert set  {out.name}  ({len(out.trained)} trained now, {len(out.skipped)} finished before)\n"
          f"manifest    {out.manifest_uri}\nmlflow run  {out.run_id}  ->  {ui}")
    for e in out.manifest["experts"]:
        lo, hi = e["interval"]
        print(f"  expert {e['index']}  t in {f'[{lo}, {hi})':<12} {e['model']['name']:<9} {e['params']:>11,} params  "
              f"{e['macs'] / 1e6:9.2f} M MACs  {e['checkpoint']}")
    print(f"sample it   denoiselab sample {out.name} --n 64 --storage {out.manifest_uri.rsplit('/', 3)[0]}")
    return 0
