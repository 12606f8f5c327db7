"""mimfast.train.fusion_trial: the block form chosen by timing the first training steps, and the
training run that uses it (where kernels run on Triton and the run names no form)."""

import pytest

from mimfast.train.config import PretrainConfig
from mimfast.train.fusion_trial import FusionTrial
from mimfast.train.pretrain import pretrain


class _Model:
    """The switch a trial drives, recording each change."""

    def __init__(self, fused_norm):
        self.fused_norm, self.kernels, self.changes = fused_norm, "triton", []

    def set_kernels(self, kernels, fused_norm=None):
        self.kernels, self.fused_norm = kernels, fused_norm
        self.changes.append(fused_norm)


def _run(trial, model, step_seconds):
    """Steps until the trial decides: each step's form, and the decision line."""
    forms = []
    for _ in range(100):
        trial.before_step()
        forms.append(model.fused_norm)
        line = trial.after_step(step_seconds[model.fused_norm])
        if line:
            return forms, line
    raise AssertionError("no decision")


@pytest.mark.parametrize("start", [False, True])
def test_keeps_the_faster_form(start):
    model = _Model(start)
    trial = FusionTrial(model, steps=3, warmup=2)
    forms, line = _run(trial, model, {start: 0.100, not start: 0.080})
    # warm-up in its own form, one untimed step in the other, then 3 timed steps each
    assert forms == [start, start, not start] + [start] * 3 + [not start] * 3
    assert trial.decided and trial.choice is (not start) and model.fused_norm is (not start)
    assert "80.0 ms" in line and "100.0 ms" in line and line.startswith("block form: " + ("unfused" if start else
                                                                                        "fused"))
    trial.before_step()  # decided: nothing changes any more
    assert trial.after_step(1.0) is None and model.fused_norm is (not start)


def test_keeps_its_own_form_within_the_margin_and_uses_medians():
    model = _Model(False)
    trial = FusionTrial(model, steps=3, warmup=0, margin=0.05)
    times = iter([9.0, 0.100, 0.101, 5.0, 0.097, 0.097, 0.0])  # the untimed step and outliers do not decide
    for _ in range(7):
        trial.before_step()
        line = trial.after_step(next(times))
    assert line and trial.choice is False and model.fused_norm is False


def test_times_are_averaged_over_processes_first():
    model = _Model(False)
    seen = []
    trial = FusionTrial(model, steps=1, warmup=0, mean=lambda t: seen.append(t) or t * (3 if model.fused_norm else 1))
    _run(trial, model, {False: 0.1, True: 0.05})  # fused faster here, slower on average over the ranks
    assert seen == [0.1, 0.05] and trial.choice is False


def test_a_failing_step_in_the_other_form_says_how_to_train_without_the_trial():
    model = _Model(False)
    trial = FusionTrial(model, steps=1, warmup=1)
    trial.before_step()
    with pytest.raises(ValueError, match="boom"):  # the model's own form: the error as it is
        with trial.guard():
            raise ValueError("boom")
    trial.after_step(0.1)
    trial.before_step()
    assert model.fused_norm is True
    with pytest.raises(RuntimeError, match="fused failed .*--fusion-trial-steps 0") as info:
        with trial.guard():
            raise ValueError("boom")
    assert isinstance(info.value.__cause__, ValueError)


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        FusionTrial(_Model(False), steps=0)
    with pytest.raises(ValueError, match="warmup"):
        FusionTrial(_Model(False), steps=1, warmup=-1)


TINY = dict(model="mae_vit_tiny_patch16", img_size=32, patch_size=8,
            model_kwargs=dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                              decoder_num_heads=2),
            data="builtin", builtin_size=16, batch_size=4, epochs=2, warmup_epochs=0, num_workers=0,
            vis_every=0, tensorboard=False, log_every=1, seed=3, max_steps=6, fusion_trial_steps=1)


def test_pretrain_runs_the_trial_with_triton_kernels(tmp_path, capsys):
    # no CUDA graph (the default on a GPU): a captured step's code is fixed, so no trial there
    summary = pretrain(PretrainConfig(**TINY, kernels="triton", cuda_graph=False, output_dir=str(tmp_path / "a")))
    assert summary["steps"] == 6 and isinstance(summary["fused_norm"], bool)
    assert "block form: " in capsys.readouterr().out
    # a form named by the run, or eager kernels: no trial
    for kw in (dict(kernels="triton", fused_norm=True), dict(kernels="eager")):
        summary = pretrain(PretrainConfig(**TINY, **kw, output_dir=str(tmp_path / str(len(kw)))))
        assert "block form: " not in capsys.readouterr().out
    assert summary["fused_norm"] is False  # eager kernels: the blocks ran unfused (MAE's default is fused)


def test_negative_trial_steps_are_refused(tmp_path):
    from mimfast.cli import build_parser
    from mimfast.train.config import config_from_args

    with pytest.raises(SystemExit, match="fusion-trial-steps"):
        config_from_args(build_parser().parse_args(["pretrain", "--fusion-trial-steps", "-1"]))
