"""Bradley–Terry trainer on tiny random Qwen3 / Llama / BERT models and the real MiniLM."""

from __future__ import annotations

import json

import pytest
import torch

from synpref.shared.modeling import load_reward_model, score_pairs
from synpref.training import cli, eval_cli
from synpref.training.batching import bt_loss, micro_batches, rank_share, step_order
from synpref.training.evaluation import pairwise_metrics, rmbench_slices
from synpref.training.reward_config import RewardConfig
from synpref.training.reward_trainer import RewardTrainer, train_reward_model
from testing.numerics import approx_fp32_forward, fp32_forward_tolerance, near_ties
from testing.tiny import build_tiny_reward_model, minilm_path

torch.set_num_threads(1)

WORDS = ["apple", "river", "stone", "cloud", "music", "paper", "light", "green", "quiet", "table", "window", "garden"]


def make_pairs(n: int, seed: int = 0, long_every: int = 0) -> list[dict]:
    """Learnable synthetic pairs: the chosen answer is polite, the rejected one rude."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        words = [
            WORDS[int(j)]
            for j in torch.randint(len(WORDS), (int(torch.randint(2, 12, (1,), generator=g)),), generator=g)
        ]
        prompt = " ".join(words)
        tail = " ".join(words[: 1 + i % 4])
        pairs.append(
            {
                "conversation": [{"role": "user", "content": f"tell me about {prompt}"}],
                "chosen": [{"role": "assistant", "content": f"thank you, gladly: {tail}"}],
                "rejected": [
                    {
                        "role": "assistant",
                        "content": f"no, go away {tail}" + (" x" * 400 if long_every and i % long_every == 0 else ""),
                    }
                ],
                "source": "even" if i % 2 == 0 else "odd",
                "id": str(i),
            }
        )
    return pairs


def texts(pairs):
    return [m["content"] for p in pairs for part in ("conversation", "chosen", "rejected") for m in p[part]]


@pytest.fixture(scope="module")
def data():
    return make_pairs(48, seed=0), make_pairs(16, seed=1, long_every=8)  # 2 eval pairs too long


@pytest.fixture(scope="module", params=["qwen3", "llama", "bert"])
def tiny_path(request, tmp_path_factory, data):
    train, evals = data
    return build_tiny_reward_model(
        tmp_path_factory.mktemp(request.param), arch=request.param, seed=3, texts=texts(train + evals), vocab_size=400
    )


def config(path, out, **kw) -> RewardConfig:
    base = dict(
        model_name_or_path=str(path),
        output_dir=str(out),
        global_batch_size=8,
        micro_batch_size=3,
        max_steps=4,
        learning_rate=5e-3,
        lr_scheduler="constant",
        max_length=128,
        logging_steps=1,
        progress=False,
        seed=7,
    )
    base.update(kw)
    return RewardConfig(**base)


def assert_same_accuracy(a: float, b: float, rewards: list[tuple[float, float]]) -> None:
    """Two accuracies over `rewards`' pairs, scored in different fp32 batches, count the same
    pairs right except at most the pairs tied within the fp32 forward bound."""
    n = len(rewards)
    tolerance = fp32_forward_tolerance(max(abs(x) for pair in rewards for x in pair))
    assert abs(round(a * n) - round(b * n)) <= near_ties(rewards, tolerance), (a, b)


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_every_parameter_changes_and_checkpoint_reloads(tiny_path, data, tmp_path):
    train, evals = data
    # Centering on: it is what moves a classifier bias (BERT), invisible to the pure BT loss.
    trainer = RewardTrainer(config(tiny_path, tmp_path, center_rewards_coefficient=0.01), train, evals)
    before = params_of(trainer.model)
    result = trainer.train()
    after = params_of(trainer.model)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters that did not move: {unchanged}"
    # The HF checkpoint loads on its own and gives the trainer's rewards.
    model, tok = load_reward_model(str(result.checkpoint_dir))
    assert (result.checkpoint_dir / "tokenizer_config.json").exists()
    assert tok.chat_template == trainer.tokenizer.chat_template
    ours = trainer.rewards(trainer.eval_enc.pairs)
    theirs = score_pairs(model, tok, evals, max_length=128, truncation="left_turns")
    # The trainer's eval batches vs score_pairs' batches: the same fp32 model in another order,
    # so the same rewards within the forward bound and the same accuracy up to near ties.
    assert len(ours) == len(theirs)
    assert [x for pair in ours for x in pair] == approx_fp32_forward([x for pair in theirs for x in pair])
    assert_same_accuracy(result.metrics["eval_accuracy"], pairwise_metrics(theirs)["accuracy"], theirs)
    assert result.metrics["eval_unfit_pairs"] == 2 and result.metrics["eval_pairs"] == 16
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in lines][:2] == ["start", "train"] and lines[-1]["event"] == "done"
    assert set(lines[-1]["eval_accuracy_by_source"]) == {"even", "odd"}


def test_real_minilm_every_parameter_changes(tmp_path):
    # BERT's classifier has a bias, which the pure BT loss cannot see (it cancels in r_c - r_r);
    # the centering term gives it a gradient, so with it on every parameter must move.
    train = make_pairs(8, seed=2)
    cfg = config(
        minilm_path(),
        tmp_path,
        global_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        max_length=48,
        center_rewards_coefficient=0.01,
    )
    trainer = RewardTrainer(cfg, train, train[:4])
    before = params_of(trainer.model)
    trainer.train()
    after = params_of(trainer.model)
    assert [k for k in before if torch.equal(before[k], after[k])] == []


def test_accumulation_micro_batching_and_checkpointing_do_not_change_the_update(data, tmp_path):
    path = build_tiny_reward_model(tmp_path / "m", arch="qwen3", seed=5, texts=texts(data[0]), vocab_size=400)
    finals = []
    # (pairs per forward, token cap (-1 auto, 0 none), gradient checkpointing, packing): all give the same update.
    runs = [(8, 0, False, "off"), (1, 0, False, "off"), (3, 200, False, "off"), (3, 0, True, "off")]
    runs += [(8, -1, False, "auto"), (8, 300, False, "on"), (8, 0, True, "on")]
    for k, (micro, cap, ckpt, packing) in enumerate(runs):
        cfg = config(
            path,
            tmp_path / f"o{k}",
            micro_batch_size=micro,
            max_tokens_per_micro_batch=cap,
            max_steps=3,
            gradient_checkpointing=ckpt,
            packing=packing,
            precision="fp64",
        )
        trainer = RewardTrainer(cfg, data[0], [])
        before = params_of(trainer.model)
        trainer.train()
        finals.append(params_of(trainer.model))
    # In fp64 the reordered sums differ by ~1e-13, where fp32 gave CPU-dependent 1e-5 after Adam;
    # 1e-7 of the largest update is safe on any CPU and far below a real change of the update.
    update = max(float((finals[0][k] - before[k]).abs().max()) for k in before)
    for other in finals[1:]:
        worst = max(float((other[k] - v).abs().max()) for k, v in finals[0].items())
        assert worst <= 1e-7 * update, f"max |diff| {worst:.3g} vs largest update {update:.3g}"


def test_unfit_pairs_are_counted_not_silently_dropped(data, tmp_path):
    path = build_tiny_reward_model(tmp_path / "m", arch="llama", seed=5, texts=texts(data[0]), vocab_size=400)
    pairs = make_pairs(40, long_every=5)
    trainer = RewardTrainer(config(path, tmp_path / "o", max_length=96, max_steps=1), pairs, [])
    assert trainer.data_report["train_unfit"] == 8
    assert trainer.data_report["train_pairs"] == 32


def test_bt_loss_terms():
    rc, rr = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    base = bt_loss(rc, rr)
    # The very operations bt_loss runs, on values whose differences are exact: equal to the bit.
    exact = {"rtol": 0.0, "atol": 0.0}
    torch.testing.assert_close(base, -torch.nn.functional.logsigmoid(rc - rr), **exact)
    torch.testing.assert_close(
        bt_loss(rc, rr, torch.tensor([0.5, 0.0])), -torch.nn.functional.logsigmoid(torch.tensor([0.5, -2.0])), **exact
    )
    torch.testing.assert_close(bt_loss(rc, rr, center_coefficient=0.01), base + 0.01 * (rc + rr) ** 2, **exact)


def test_batching_helpers():
    widths = [5, 50, 7, 49, 6, 48, 100, 3]
    a = step_order(8, seed=1, epoch=0, global_batch=4, lengths=None, window=2)
    assert a == step_order(8, seed=1, epoch=0, global_batch=4, lengths=None, window=2)
    assert a != step_order(8, seed=1, epoch=1, global_batch=4, lengths=None, window=2)
    assert sorted(i for b in a for i in b) == list(range(8))
    grouped = step_order(8, seed=1, epoch=0, global_batch=4, lengths=widths, window=2)
    assert sorted(sorted(b) for b in grouped) == [[0, 2, 4, 7], [1, 3, 5, 6]]
    shares = [rank_share(range(8), widths, r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(8)) and shares[0][0] == 6
    micros = micro_batches(rank_share(range(8), widths, 0, 1), widths, size=3, max_tokens=250)
    assert [i for m in micros for i in m] == sorted(range(8), key=lambda i: -widths[i])
    assert all(len(m) <= 3 and (len(m) == 1 or 2 * widths[m[0]] * len(m) <= 250) for m in micros)


def test_config_yaml_overrides_presets(tmp_path):
    path = tmp_path / "rm.yaml"
    path.write_text("model_name_or_path: m\npreset: dev\ntrain_files: a.parquet\nmicro_batch_size: 4\n")
    cfg = RewardConfig.load(path, ["learning_rate=1e-5", "eval_files=[x.jsonl, y.jsonl]", "compile=true"])
    assert (cfg.learning_rate, cfg.global_batch_size, cfg.lr_scheduler) == (1e-5, 256, "linear")
    assert cfg.train_files == ["a.parquet"] and cfg.eval_files == ["x.jsonl", "y.jsonl"] and cfg.compile is True
    final = RewardConfig.load(None, preset="final")
    assert (final.learning_rate, final.global_batch_size, final.lr_scheduler) == (3e-6, 10240, "constant")
    assert all(RewardConfig.field_help().values())
    with pytest.raises(ValueError, match="unknown"):
        RewardConfig.load(None, ["learning_rat=1"])
    with pytest.raises(ValueError, match="lr_scheduler"):
        RewardConfig.load(None, ["lr_scheduler=cosine"])


def test_evaluation_metrics():
    m = pairwise_metrics([(1.0, 0.0), (0.0, 1.0), (2.0, 2.0)], ["a", "b", "a"])
    assert m["accuracy"] == 1 / 3 and m["accuracy_by_source"] == {"a": 0.5, "b": 0.0}
    # Item 1 prefers everything chosen; item 2 is fooled by style: rejected[j] wins when j > i.
    all_right = [[1.0] * 3 for _ in range(3)]
    styled = [[1.0 if i >= j else 0.0 for j in range(3)] for i in range(3)]
    s = rmbench_slices([all_right, styled])
    assert (s["hard"], s["normal"], s["easy"]) == (0.5, 1.0, 1.0)


def test_cli_print_config_and_submit_dispatch(monkeypatch, capsys):
    assert cli.main(["--preset", "final", "--set", "model_name_or_path=m", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["global_batch_size"] == 10240 and printed["model_name_or_path"] == "m"
    seen = []
    from synpref.training import k8s_job

    monkeypatch.setattr(k8s_job, "main_submit", lambda argv: seen.append(argv) or 0)
    assert cli.main(["submit", "--config", "x.yaml"]) == 0 and seen == [["--config", "x.yaml"]]
    assert cli.main(["--set", "nonsense"]) == 2


def test_cli_trains_and_eval_cli_scores(tmp_path, capsys):
    from synpref.training.data import write_jsonl

    train = write_jsonl(make_pairs(16), tmp_path / "train.jsonl")
    evals = write_jsonl(make_pairs(8, seed=9), tmp_path / "eval.jsonl.gz")
    model = build_tiny_reward_model(tmp_path / "m", arch="qwen3", texts=texts(make_pairs(16)), vocab_size=300)
    args = [
        "--set",
        f"model_name_or_path={model}",
        "--set",
        f"output_dir={tmp_path / 'out'}",
        "--set",
        f"train_files=[{train}]",
        "--set",
        f"eval_files=[{evals}]",
        "--set",
        "global_batch_size=8",
        "--set",
        "max_steps=2",
        "--set",
        "max_length=128",
        "--set",
        "progress=false",
    ]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval_pairs"] == 8 and 0.0 <= result["eval_accuracy"] <= 1.0
    out = tmp_path / "eval.json"
    rmbench = tmp_path / "rmb"
    rmbench.mkdir()
    items = [
        {"id": i, "subset": "chat", "prompt": f"q{i}", "chosen": ["a", "b", "c"], "rejected": ["d", "e", "f"]}
        for i in range(3)
    ]
    (rmbench / "chat_filtered.json").write_text(json.dumps(items))
    assert (
        eval_cli.main(
            [
                "--model",
                result["checkpoint_dir"],
                "--pairs",
                str(evals),
                "--rmbench",
                str(rmbench),
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    # The eval CLI's rewards, recomputed by its very call, vs the trainer's own eval batches.
    model, tok = load_reward_model(result["checkpoint_dir"])
    rewards = score_pairs(model, tok, make_pairs(8, seed=9), 4096, 16, "left_turns")
    assert report["eval.jsonl.gz"]["accuracy"] == pairwise_metrics(rewards)["accuracy"]
    assert_same_accuracy(report["eval.jsonl.gz"]["accuracy"], result["eval_accuracy"], rewards)
    assert set(report["rmbench"]) >= {"hard", "normal", "easy", "domains"} and report["rmbench"]["items"] == 3


def test_train_reward_model_api(data, tmp_path):
    path = build_tiny_reward_model(tmp_path / "m", arch="qwen3", texts=texts(data[0]), vocab_size=300)
    result = train_reward_model(config(path, tmp_path / "o", max_steps=2), *data)
    assert result.checkpoint_dir == tmp_path / "o" / "final" and result.metrics["steps"] == 2
