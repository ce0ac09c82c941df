"""``treespec`` command line: ``serve``, ``bench``, ``distill``, ``self-prompts`` (flags generated from the
config models) and ``train-drafter``."""

from __future__ import annotations

import argparse
import logging
import sys

import yaml

from server.config import ServerConfig, add_config_flags, config_from_args

SHUTDOWN_GRACE_S = 5  # after the drain: uvicorn's wait for the last responses to be written


def serve(cfg: ServerConfig) -> None:
    import uvicorn

    from server.api.app import DrainingServer, create_app
    from server.build import build_engine

    llm, name = build_engine(cfg)
    app = create_app(llm, name, cfg)
    logging.getLogger(__name__).info("serving %s on http://%s:%d", name, cfg.host, cfg.port)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    DrainingServer(config, lambda: app.state.serving.admission.drain(cfg.shutdown_timeout)).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="treespec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_config_flags(sub.add_parser("serve", help="serve the OpenAI-compatible API"))
    from bench.harness import add_bench_flags, run_bench
    add_bench_flags(sub.add_parser("bench", help="run a Spec-Bench-format benchmark through the engine"))
    from drafters.train.distill import add_distill_flags, run_distill
    distill = sub.add_parser("distill", help="have the target answer training prompts (self-distillation data)")
    add_config_flags(distill)
    add_distill_flags(distill)
    from drafters.train.self_prompts import add_self_prompt_flags, run_self_prompts
    self_prompts = sub.add_parser("self-prompts", help="have the target write user prompts (Magpie) for distill")
    add_config_flags(self_prompts)
    add_self_prompt_flags(self_prompts)
    from drafters.train.cli import add_train_flags, run_train
    add_train_flags(sub.add_parser("train-drafter", help="extract target features and train a drafter"))
    args = parser.parse_args(argv)
    if args.command == "train-drafter":
        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run_train(args)
        return
    try:
        cfg = config_from_args(args)
    except (OSError, TypeError, ValueError, yaml.YAMLError) as exc:   # missing preset, bad YAML, invalid options
        parser.error(str(exc))
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        serve(cfg)
    elif args.command == "distill":
        run_distill(cfg, args)
    elif args.command == "self-prompts":
        run_self_prompts(cfg, args)
    else:
        run_bench(cfg, args)


if __name__ == "__main__":
    sys.exit(main())
