"""The RL stages end to end on the CPU: GRPO's reward rises on an obvious task, the reference never moves and is
never saved, PPO trains its critic beside the policy, and both refuse what they cannot do."""
import json

import pytest
import torch

from helpers import TINY_MODEL, random_model, record_tokenizer_reads, training_side, write_stage_checkpoint
from minimind_pl.checkpoints import load_model
from minimind_pl.cli import run_lightning
from minimind_pl.errors import UserError
from minimind_pl.model import MiniMindForCausalLM
from minimind_pl.data.prompts import prompt_lists
from minimind_pl.stages import grpo
from minimind_pl.stages import ppo as ppo_stage
from minimind_pl.stages.ppo import PPO
from minimind_pl.stages.rollouts import RolloutStage, answer_rows, with_stop

CJK_REWARD = '[{"class_path": "helpers.CJKShare"}]'


@pytest.fixture(scope="module")
def prompts_file(shared_dir, tmp_path_factory):
    """32 prompts: the first user turns of the shared SFT corpus, as ``{"prompt": ...}`` lines."""
    path = tmp_path_factory.mktemp("rl") / "prompts.jsonl"
    with open(shared_dir / "corpus" / "sft_real.jsonl", encoding="utf-8") as f:
        firsts = [next(m["content"] for m in json.loads(line)["conversations"] if m["role"] == "user") for line in f]
    path.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in firsts[:32]), "utf-8")
    return path


TINY_SHAPE = {k.split(".")[-1]: int(v) for k, v in zip(TINY_MODEL[0::2], TINY_MODEL[1::2])}


@pytest.fixture(scope="module")
def start_checkpoint(shared_dir, tmp_path_factory):
    """A random tiny model (TINY_MODEL's shape) saved as a stage checkpoint: the policy's and reference's start."""
    return write_stage_checkpoint(random_model(seed=3, **TINY_SHAPE), tmp_path_factory.mktemp("start") / "start.ckpt",
                                  shared_dir / "minimind")


def rl_args(stage, tmp_path, shared_dir, prompts_file, start, max_steps, extra=()):
    """A tiny CPU run of ``configs/minimind3/<stage>.yaml`` on the prompts, rewarded by ``CJKShare``."""
    callbacks = json.dumps([{"init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": max_steps}}])
    return ["fit", "--config", f"configs/minimind3/{stage}.yaml", *TINY_MODEL, "--model.init_weights", str(start),
            "--model.rewards", CJK_REWARD, "--model.max_new_tokens", "8", "--model.temperature", "1.0",
            "--data.train_path", str(prompts_file), "--data.val_fraction", "0", "--data.seq_len", "64",
            "--data.tokenizer", str(shared_dir / "minimind"), "--data.batch_size", "4", "--data.num_workers", "0",
            "--data.thinking_ratio", "0", "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", str(max_steps),
            "--trainer.max_epochs", "100", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--trainer.callbacks", callbacks, *extra]


def logged(cli, tag):
    """Every value TensorBoard got for ``tag``, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def test_grpo_raises_the_reward_and_leaves_the_reference_as_it_started(tmp_path, shared_dir, prompts_file,
                                                                        start_checkpoint):
    cli = run_lightning(rl_args("grpo", tmp_path, shared_dir, prompts_file, start_checkpoint, 24,
                                ["--model.learning_rate", "3e-3", "--model.num_generations", "4"]))
    rewards = logged(cli, "train/reward")
    assert len(rewards) == 24
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first + 0.15, rewards
    start = load_model(str(start_checkpoint), device="cpu").state_dict()
    reference = cli.model.reference.model.state_dict()
    assert all(torch.equal(reference[k], start[k]) for k in start)
    assert not torch.equal(cli.model.model.lm_head.weight, start["lm_head.weight"])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("reference") for k in saved)
    assert all(logged(cli, tag) for tag in ("train/kl", "train/clip_fraction", "train/answer_length", "train/reward/cjk"))


def record_calls(monkeypatch, owner, name: str) -> list[tuple[tuple, object]]:
    """Wrap ``owner.name`` (a function of a module, or a method of a class) so that each call's positional
    arguments and result are kept, in call order."""
    calls, original = [], getattr(owner, name)

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, result))
        return result

    monkeypatch.setattr(owner, name, recording)
    return calls


def test_grpo_compares_each_answer_with_the_other_answers_to_its_own_prompt(tmp_path, shared_dir, prompts_file,
                                                                            moe_start_checkpoint, monkeypatch):
    """Each sampled row continues the prompt its rewards were given, and its advantage is its reward against the
    answers to the same prompt: (r - mean) / (population std + 1e-4), grouped here by the prompt's text. The update
    minimises that loss, with the run's settings (not the defaults), plus the MoE policy's router loss."""
    made = record_calls(monkeypatch, RolloutStage, "make_rollouts")
    losses = record_calls(monkeypatch, grpo, "grpo_loss")
    log_probs = record_calls(monkeypatch, RolloutStage, "policy_log_probs")
    updates = record_calls(monkeypatch, RolloutStage, "optimize")
    cli = run_lightning(rl_args("grpo", tmp_path, shared_dir, prompts_file, moe_start_checkpoint, 1, [
        "--model.config.use_moe", "true", "--model.num_generations", "3", "--model.beta", "0.3",
        "--model.loss_type", "grpo", "--model.epsilon", "0.25", "--model.epsilon_high", "4.0"]))
    (_, batch, _, _), rollouts = made[0]
    tok = cli.model.tokenizer
    asked = tok.decode_batch(prompt_lists(batch))
    assert len(set(asked)) == 4 and len(rollouts.samples) == 12
    for row, sample in enumerate(rollouts.samples):
        first_answer_label = int(rollouts.mask[row].nonzero()[0])  # labels[t] is the token after input_ids[t]
        assert tok.decode(rollouts.input_ids[row, :first_answer_label + 1].tolist()) == sample.prompt == asked[row // 3]
        answer = rollouts.labels[row][rollouts.mask[row]].tolist()
        assert tok.decode(answer, skip_special_tokens=True) == sample.completion
        assert rollouts.answer_tokens[row] == len(answer)
    # every prompt and answer token, counted for tokens/s: each row's prompt (up to its first label) and answer
    assert rollouts.tokens == sum(int(m.nonzero()[0]) + 1 + int(m.sum()) for m in rollouts.mask)
    rewards = rollouts.rewards.tolist()
    groups: dict[str, list[float]] = {}
    for sample, reward in zip(rollouts.samples, rewards):
        groups.setdefault(sample.prompt, []).append(reward)
    expected = []
    for sample, reward in zip(rollouts.samples, rewards):
        group = groups[sample.prompt]
        mean = sum(group) / len(group)
        std = (sum((r - mean) ** 2 for r in group) / len(group)) ** 0.5
        expected.append((reward - mean) / (std + 1e-4))
    assert max(abs(a) for a in expected) > 0.5  # the answers to one prompt scored differently
    (_, _, _, advantages, _, *settings), (loss, _) = losses[0]
    assert advantages.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert settings == [0.3, "grpo", 0.25, 4.0]  # beta, loss_type, epsilon, epsilon_high
    (_, (_, aux)), ((_, update), _) = log_probs[0], updates[0]
    assert len(updates) == 1 and aux > 0
    torch.testing.assert_close(update, loss + aux)


def test_ppo_trains_on_the_gae_of_its_gamma_and_lambda(tmp_path, shared_dir, prompts_file, start_checkpoint,
                                                       monkeypatch):
    """The returns and whitened advantages the passes train on are GAE of the answer's reward (on its last token) and
    the critic's values, at the run's γ = 0.5 and λ = 0.8, worked out here token by token."""
    gamma, lam = 0.5, 0.8
    estimates = record_calls(monkeypatch, PPO, "advantages")
    run_lightning(rl_args("ppo", tmp_path, shared_dir, prompts_file, start_checkpoint, 4,
                          ["--model.gamma", str(gamma), "--model.lam", str(lam), "--model.early_stop_kl", "100"]))
    (_, rollouts), (advantages, returns, values) = estimates[0]
    raw = []
    for row, reward in enumerate(rollouts.rewards.tolist()):
        answer = rollouts.mask[row].nonzero().flatten().tolist()
        v = values[row, answer].tolist()
        row_advantages, running = [0.0] * len(v), 0.0
        for t in reversed(range(len(v))):  # δ_t = r_t + γ V_{t+1} - V_t (V = 0 after the answer); A_t = δ_t + γλ A_{t+1}
            delta = (reward if t == len(v) - 1 else 0.0) + gamma * (v[t + 1] if t + 1 < len(v) else 0.0) - v[t]
            running = delta + gamma * lam * running
            row_advantages[t] = running
        assert returns[row, answer].tolist() == pytest.approx([a + b for a, b in zip(row_advantages, v)], abs=1e-5)
        raw.append(row_advantages)
    flat = [a for row in raw for a in row]
    mean = sum(flat) / len(flat)
    std = (sum((a - mean) ** 2 for a in flat) / len(flat)) ** 0.5
    whitened = [a for row in range(len(raw)) for a in advantages[row][rollouts.mask[row]].tolist()]
    assert whitened == pytest.approx([(a - mean) / std for a in flat], abs=1e-4)
    assert (advantages[~rollouts.mask] == 0).all() and (returns[~rollouts.mask] == 0).all()


def test_grpo_with_several_iterations_makes_that_many_optimizer_steps(tmp_path, shared_dir, prompts_file,
                                                                      start_checkpoint):
    cli = run_lightning(rl_args("grpo", tmp_path, shared_dir, prompts_file, start_checkpoint, 4,
                                ["--model.num_iterations", "2", "--model.loss_type", "grpo",
                                 "--model.learning_rate", "0.05"]))
    assert cli.trainer.global_step == 4 and cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2
    # the second update measures its ratio against the sampling policy, which the first moved
    assert max(logged(cli, "train/clip_fraction")) > 0


def test_an_rl_run_reads_the_tokenizer_once_for_its_answers_validation_and_samples(tmp_path, shared_dir, prompts_file,
                                                                                   start_checkpoint, monkeypatch):
    readers = record_tokenizer_reads(monkeypatch)
    cli = run_lightning(rl_args("grpo", tmp_path, shared_dir, prompts_file, start_checkpoint, 2,
                                ["--data.val_fraction", "0.125", "--trainer.val_check_interval", "2",
                                 "--trainer.limit_val_batches", "1"]))
    assert cli.trainer.global_step == 2 and "val/reward" in cli.trainer.callback_metrics
    assert training_side(readers) == ["minimind_pl.stages.base"]


def test_ppo_trains_policy_and_critic_and_tools_read_the_policy(tmp_path, shared_dir, prompts_file, start_checkpoint):
    cli = run_lightning(rl_args("ppo", tmp_path, shared_dir, prompts_file, start_checkpoint, 4,
                                ["--model.learning_rate", "1e-3", "--model.critic_learning_rate", "2e-3",
                                 "--model.early_stop_kl", "100"]))
    assert cli.trainer.global_step == 4  # one batch of 4 answers: 2 passes x 2 mini-batches of 2
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["stage"] == "PPO" and "reference_fingerprint" in saved
    groups = cli.model.optimizers().optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == [1e-3, 1e-3, 2e-3, 2e-3]  # policy (decayed, not), critic (same)
    start = ValueModelStart.value_head(cli.model)
    assert not torch.equal(saved["state_dict"]["critic.value_head.weight"], start)  # the critic trained
    policy = load_model(str(tmp_path / "ckpt" / "last.ckpt"), device="cpu")
    assert isinstance(policy, MiniMindForCausalLM)
    assert torch.equal(policy.lm_head.weight, cli.model.model.lm_head.weight)
    for tag in ("train/value_loss", "train/approx_kl", "train/grad_norm", "train/grad_norm_critic"):
        assert torch.isfinite(torch.tensor(logged(cli, tag))).all(), tag


class ValueModelStart:
    """The value head a PPO stage starts with: built again from the same seed as the stage built it."""

    @staticmethod
    def value_head(stage) -> torch.Tensor:
        torch.manual_seed(42)  # the config's seed_everything, before the stage is built
        return PPO(config=stage.config, tokenizer=stage.hparams.tokenizer).critic.value_head.weight.detach()


def test_ppo_stops_the_passes_when_the_policy_moves_too_far(tmp_path, shared_dir, prompts_file, start_checkpoint,
                                                           monkeypatch):
    evaluated = record_calls(monkeypatch, ppo_stage, "ppo_losses")
    cli = run_lightning(rl_args("ppo", tmp_path, shared_dir, prompts_file, start_checkpoint, 8,
                                ["--model.learning_rate", "0.5", "--model.early_stop_kl", "1e-9",
                                 "--trainer.limit_train_batches", "2"]))
    # each batch: the first mini-batch updates (ratio 1); the second sees a moved policy and stops the passes; the
    # batch's other steps change nothing, so it still counts 4 steps and AdamW made 2 updates in all
    assert cli.trainer.global_step == 8
    optimizer = cli.model.optimizers().optimizer
    assert int(optimizer.state[cli.model.model.lm_head.weight]["step"]) == 2
    assert len(evaluated) == 4  # per batch the two mini-batches of the first pass; the second pass never starts


def test_a_checkpoint_interval_that_a_batch_would_jump_over_is_refused(tmp_path, shared_dir, prompts_file,
                                                                       start_checkpoint):
    with pytest.raises(UserError, match="makes 2 optimizer steps.*multiple of 2"):
        run_lightning(rl_args("grpo", tmp_path, shared_dir, prompts_file, start_checkpoint, 3,
                              ["--model.num_iterations", "2"]))


def test_rl_stages_refuse_trainer_clipping_and_empty_rewards(tmp_path, shared_dir, prompts_file, start_checkpoint):
    args = rl_args("grpo", tmp_path, shared_dir, prompts_file, start_checkpoint, 1)
    with pytest.raises(UserError, match="set --trainer.gradient_clip_val null .*max_grad_norm"):
        run_lightning(args + ["--trainer.gradient_clip_val", "1.0"])
    with pytest.raises(UserError, match="accumulate_grad_batches 1 \\(got 2\\)"):
        run_lightning(args + ["--trainer.accumulate_grad_batches", "2"])
    with pytest.raises(UserError, match="rewards is empty"):
        run_lightning(args + ["--model.rewards", "[]"])
    with pytest.raises(UserError, match="temperature 0 samples the same answer"):
        run_lightning(args + ["--model.temperature", "0"])


def test_a_resumed_grpo_run_ends_with_the_straight_runs_weights(tmp_path, shared_dir, prompts_file, start_checkpoint):
    """The sampling draws come from the RNG states the checkpoint holds, so the resumed run samples the same
    answers and makes the same updates."""
    keep = json.dumps([{"init_args": {"dirpath": str(tmp_path / "a" / "ckpt"), "every_n_train_steps": 2,
                                      "save_top_k": -1}}])
    run_lightning(rl_args("grpo", tmp_path / "a", shared_dir, prompts_file, start_checkpoint, 4,
                          ["--model.learning_rate", "3e-3", "--trainer.callbacks", keep]))
    run_lightning(rl_args("grpo", tmp_path / "b", shared_dir, prompts_file, start_checkpoint, 4,
                          ["--model.learning_rate", "3e-3",
                           "--ckpt_path", str(tmp_path / "a" / "ckpt" / "epoch=0-step=2.ckpt")]))
    a, b = (load_model(str(tmp_path / run / "ckpt" / "last.ckpt"), device="cpu").state_dict() for run in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    moved = load_model(str(tmp_path / "a" / "ckpt" / "epoch=0-step=2.ckpt"), device="cpu").state_dict()
    assert not torch.equal(moved["lm_head.weight"], a["lm_head.weight"])


def test_rewards_given_as_objects_are_recorded_as_plain_config(shared_dir):
    from minimind_pl.config import ModelConfig
    from minimind_pl.rewards import AnswerMatch
    from minimind_pl.stages import GRPO

    stage = GRPO(config=ModelConfig.from_preset("debug"), rewards=[AnswerMatch(mode="exact")],
                 tokenizer=str(shared_dir / "minimind"))
    assert stage.hparams["rewards"] == [{"class_path": "minimind_pl.rewards.AnswerMatch", "init_args": {
        "mode": "exact", "correct": 1.0, "wrong": 0.0, "tolerance": 1e-6, "weight": 1.0}}]


def test_resuming_against_another_reference_is_refused(tmp_path, shared_dir, prompts_file, start_checkpoint):
    run_lightning(rl_args("grpo", tmp_path / "a", shared_dir, prompts_file, start_checkpoint, 2))
    other = write_stage_checkpoint(random_model(seed=4, **TINY_SHAPE), tmp_path / "other.ckpt", shared_dir / "minimind")
    args = rl_args("grpo", tmp_path / "b", shared_dir, prompts_file, other, 4,
                   ["--ckpt_path", str(tmp_path / "a" / "ckpt" / "last.ckpt")])
    with pytest.raises(UserError, match="another reference model"):
        run_lightning(args)


def test_answer_rows_label_the_answer_through_its_eos():
    answers = with_stop([[9], [10, 11, 12]], max_new_tokens=3, eos_id=2)  # row 0 stopped early; row 1 was cut off
    assert answers == [[9, 2], [10, 11, 12]]
    input_ids, labels = answer_rows([[5, 6, 7], [8]], answers, pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7, 9], [8, 10, 11, 0]]  # the last token is only a target
    assert labels.tolist() == [[-100, -100, 9, 2], [10, 11, 12, -100]]


def test_a_resumed_ppo_run_takes_a_changed_critic_learning_rate(tmp_path, shared_dir, prompts_file, start_checkpoint):
    run_lightning(rl_args("ppo", tmp_path / "a", shared_dir, prompts_file, start_checkpoint, 4,
                          ["--model.critic_learning_rate", "1e-3"]))
    cli = run_lightning(rl_args("ppo", tmp_path / "b", shared_dir, prompts_file, start_checkpoint, 8,
                                ["--model.critic_learning_rate", "5e-3",
                                 "--ckpt_path", str(tmp_path / "a" / "ckpt" / "last.ckpt")]))
    assert [g["initial_lr"] for g in cli.model.optimizers().optimizer.param_groups][2:] == [5e-3, 5e-3]


def refused_and_accepted(build, refused: list[dict], accepted: list[dict], message: str) -> None:
    """``build(**args)`` raises a UserError matching ``message`` for each of ``refused`` and builds each of
    ``accepted`` (the edges of each range)."""
    for args in refused:
        with pytest.raises(UserError, match=message):
            build(**args)
    for args in accepted:
        build(**args)


def test_ppo_and_grpo_settings_out_of_range_are_refused_at_their_edges():
    from minimind_pl.config import ModelConfig
    from minimind_pl.stages import GRPO

    config = ModelConfig.from_preset("debug", hidden_size=32, num_hidden_layers=1)
    refused_and_accepted(
        lambda **a: PPO(config=config, **a),
        [{"ppo_epochs": 0}, {"mini_batch_size": 0}], [{"ppo_epochs": 1, "mini_batch_size": 1}],
        "ppo_epochs and mini_batch_size must be >= 1, got")
    refused_and_accepted(
        lambda **a: PPO(config=config, **a),
        [{"clip_epsilon": 0}, {"value_clip": 0}, {"vf_coef": -0.01}, {"kl_coef": -0.01}, {"gamma": -0.01},
         {"gamma": 1.01}, {"lam": -0.01}, {"lam": 1.01}],
        [{"vf_coef": 0, "kl_coef": 0, "gamma": 0, "lam": 0}, {"gamma": 1, "lam": 1}],
        "PPO needs clip_epsilon > 0, value_clip > 0, vf_coef >= 0, kl_coef >= 0 and gamma, lam in")
    refused_and_accepted(
        lambda **a: GRPO(config=config, **a),
        [{"num_generations": 1}, {"num_iterations": 0}], [{"num_generations": 2, "num_iterations": 1}],
        "num_generations must be >= 2")
    refused_and_accepted(
        lambda **a: GRPO(config=config, **a),
        [{"beta": -0.01}, {"epsilon": 0}, {"epsilon_high": 0}], [{"beta": 0, "epsilon": 1e-3, "epsilon_high": 1e-3}],
        "GRPO needs beta >= 0, epsilon > 0 and epsilon_high > 0")
    refused_and_accepted(
        lambda **a: GRPO(config=config, **a), [{"temperature": 0}], [{"temperature": 1e-3}],
        r"^--model\.temperature 0 samples the same answer num_generations times: every advantage would be 0 and "
        r"nothing would be learned; sample \(temperature > 0\)$")
    refused_and_accepted(lambda **a: GRPO(config=config, **a), [{"loss_type": "ppo"}], [{"loss_type": "grpo"}],
                         "--model.loss_type must be one of cispo, grpo, got 'ppo'")
    refused_and_accepted(
        lambda **a: GRPO(config=config, **a),
        [{"max_new_tokens": 0}, {"max_grad_norm": 0}], [{"max_new_tokens": 1, "max_grad_norm": 1e-3}],
        "max_new_tokens must be >= 1 and max_grad_norm > 0")


@pytest.fixture(scope="module")
def moe_start_checkpoint(shared_dir, tmp_path_factory):
    """start_checkpoint's shape with MoE feed-forwards (4 experts, top-2): a policy with a router loss."""
    return write_stage_checkpoint(random_model(seed=3, use_moe=True, **TINY_SHAPE),
                                  tmp_path_factory.mktemp("moe") / "start.ckpt", shared_dir / "minimind")


def test_ppo_updates_on_its_settings_policy_plus_value_plus_router_loss_each_model_clipped_apart(
        tmp_path, shared_dir, prompts_file, moe_start_checkpoint, monkeypatch):
    """Four full-batch passes of an MoE policy with settings that are not the defaults: each update minimises
    policy loss + vf_coef x value loss + the router loss, with the run's clip ranges and KL weight; the critic's value
    loss falls; each model's gradients are clipped to max_grad_norm on their own."""
    losses = record_calls(monkeypatch, ppo_stage, "ppo_losses")
    log_probs = record_calls(monkeypatch, RolloutStage, "policy_log_probs")
    updates = record_calls(monkeypatch, RolloutStage, "optimize")
    clipped, clip = [], PPO.configure_gradient_clipping

    def clip_and_measure(stage, *args, **kwargs):  # the gradient norms each model steps with
        clip(stage, *args, **kwargs)
        clipped.append([torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                              if p.grad is not None])).item()
                        for model in (stage.model, stage.critic)])

    monkeypatch.setattr(PPO, "configure_gradient_clipping", clip_and_measure)
    cli = run_lightning(rl_args("ppo", tmp_path, shared_dir, prompts_file, moe_start_checkpoint, 4, [
        "--model.config.use_moe", "true", "--model.clip_epsilon", "0.3", "--model.value_clip", "0.4",
        "--model.kl_coef", "0.05", "--model.vf_coef", "0.7", "--model.max_grad_norm", "1e-3",
        "--model.ppo_epochs", "4", "--model.mini_batch_size", "4", "--model.early_stop_kl", "100",
        "--model.learning_rate", "1e-6", "--model.critic_learning_rate", "1e-4"]))
    steps = [(args, result) for args, result in log_probs if len(args) > 2]  # the passes' (with their rows)
    assert len(losses) == len(steps) == len(updates) == 4
    for (args, (policy_loss, value_loss, _)), (_, (_, aux)), ((_, loss), _) in zip(losses, steps, updates):
        assert args[8:] == (0.3, 0.4, 0.05)  # clip_epsilon, value_clip, kl_coef
        assert aux > 0
        torch.testing.assert_close(loss, policy_loss + 0.7 * value_loss + aux)
    value_losses = [float(result[1]) for _, result in losses]
    assert value_losses[-1] < 0.9 * value_losses[0], value_losses
    assert [norm for step in clipped for norm in step] == pytest.approx([1e-3] * 8, rel=1e-3)
    optimizer = cli.model.optimizers().optimizer
    assert int(optimizer.state[cli.model.model.lm_head.weight]["step"]) == 4  # every pass updated


def test_rl_stages_default_to_minimind_s_recipe():
    """The defaults (what --help shows and the CLI fills in) are MiniMind's (trainer/train_ppo.py, train_grpo.py;
    its generate's top_p and top_k): the shipped configs set only what differs."""
    import inspect

    from minimind_pl.stages import GRPO

    def defaults(cls, names):
        parameters = inspect.signature(cls.__init__).parameters
        return {name: parameters[name].default for name in names}

    assert defaults(RolloutStage, ("max_new_tokens", "temperature", "top_p", "top_k", "max_grad_norm",
                                   "learning_rate")) == {
        "max_new_tokens": 1024, "temperature": 0.8, "top_p": 0.85, "top_k": 50, "max_grad_norm": 1.0,
        "learning_rate": 3e-7}
    assert defaults(PPO, ("ppo_epochs", "mini_batch_size", "clip_epsilon", "value_clip", "vf_coef", "kl_coef", "gamma",
                          "lam", "early_stop_kl", "critic_learning_rate")) == {
        "ppo_epochs": 2, "mini_batch_size": 2, "clip_epsilon": 0.2, "value_clip": 0.2, "vf_coef": 0.5,
        "kl_coef": 0.02, "gamma": 1.0, "lam": 0.95, "early_stop_kl": 0.25, "critic_learning_rate": 5e-7}
    assert defaults(GRPO, ("num_generations", "loss_type", "beta", "epsilon", "epsilon_high", "num_iterations")) == {
        "num_generations": 6, "loss_type": "cispo", "beta": 0.1, "epsilon": 0.2, "epsilon_high": 5.0,
        "num_iterations": 1}
