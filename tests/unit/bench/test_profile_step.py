"""The step profiler builds the served engine, profiles real steps and reports each phase and the top ops."""

from __future__ import annotations

import json

from bench.profile_step import main


def test_profiles_plain_and_eagle_steps(tmp_path, default_model_dir):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "writing",
                                     "turns": ["Write two sentences about the sea."]}) + "\n")
    out = tmp_path / "profile.json"
    main(["--model", str(default_model_dir), "--drafters", "none", "eagle", "--questions", str(questions),
          "--warmup", "2", "--steps", "2", "--budget", "4", "--out", str(out)])
    report = json.loads(out.read_text())
    plain, eagle = report["results"]
    assert (plain["drafter"], eagle["drafter"]) == ("none", "eagle")
    assert plain["steps"] == eagle["steps"] == 2
    assert eagle["runner_split_ms"]["draft"] > 10 * plain["runner_split_ms"]["draft"]   # eagle drafts; plain does not
    assert any(row["op"] == "aten::mm" or "linear" in row["op"] for row in eagle["top_host_ops"])
    assert report["command"].startswith("python -m bench.profile_step")
