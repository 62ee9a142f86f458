"""Config presets, validation and command-line overrides, including the error texts a user sees."""

import pytest

from config import PRESETS, Config, ConfigError
from gptkit.cli import parse_args
from model import count_parameters


def test_overrides_are_typed_and_land_in_the_right_section():
    parsed = parse_args(["--preset=tiny", "--n_layer=8", "--learning_rate=1e-3", "--compile=True",
                         "--dataset=shakespeare", "--max_iters=1e4"])
    config = parsed.config
    assert config.preset == "tiny"
    assert config.model.n_layer == 8 and isinstance(config.model.n_layer, int)
    assert config.train.learning_rate == pytest.approx(1e-3)
    assert config.train.compile is True
    assert config.train.max_iters == 10000
    assert config.data.dataset == "shakespeare"
    assert parsed.overridden == {"n_layer", "learning_rate", "compile", "dataset", "max_iters"}
    # untouched fields keep the preset's values
    assert config.model.n_embd == PRESETS["tiny"]().model.n_embd


def test_bare_flag_means_true_and_auto_means_none():
    config = parse_args(["--preset=tiny", "--resume", "--compile=auto"]).config
    assert config.train.resume is True
    assert config.train.compile is None


def test_learning_rate_override_scales_min_lr_with_it():
    tiny = PRESETS["tiny"]().train
    config = parse_args(["--preset=tiny", "--learning_rate=1e-5"]).config
    assert config.train.min_lr == pytest.approx(1e-5 * tiny.min_lr / tiny.learning_rate)
    # tiny trains its matrices with Muon: its rate moves with learning_rate unless given apart
    assert tiny.optimizer == "muon"
    assert config.train.muon_lr == pytest.approx(1e-5 * tiny.muon_lr / tiny.learning_rate)
    assert parse_args(["--preset=tiny", "--learning_rate=1e-5", "--muon_lr=0.01"]).config.train.muon_lr == 0.01
    # a preset that trains with AdamW keeps Muon's own default when a user switches to it
    small = parse_args(["--preset=small", "--optimizer=muon", "--learning_rate=1e-3"]).config.train
    assert small.muon_lr == PRESETS["small"]().train.muon_lr


def test_unknown_key_suggests_the_closest_names():
    with pytest.raises(ConfigError, match=r"unknown option --n_layr; did you mean --n_layer"):
        parse_args(["--preset=tiny", "--n_layr=3"])


@pytest.mark.parametrize("args, message", [
    (["--n_embd=100", "--n_head=3"], r"n_embd=100 is not divisible by n_head=3; pick n_head from \[1, 2, 4, 5"),
    (["--n_layer=0"], r"n_layer=0 must be a positive number"),
    (["--batch_size=-2"], r"batch_size=-2 must be a positive number"),
    (["--dtype=fp8"], r"dtype='fp8' is not one of auto, float32, bfloat16, float16"),
    (["--device=tpu"], r"device='tpu' is not known; use auto, cpu, cuda"),
    (["--n_layer=abc"], r"--n_layer=abc is not an integer"),
    (["--learning_rate=fast"], r"--learning_rate=fast is not a number"),
    (["--compile=maybe"], r"--compile=maybe is not a boolean"),
    (["--dropout=1.5"], r"dropout=1.5 is outside \[0, 1\)"),
    (["--sampling=epochs"], r"sampling='epochs' is not one of random, epoch \(did you mean epoch\?\)"),
    (["--tokenizer=bpe"], r"tokenizer='bpe' is not one of gpt2, char"),
    (["n_layer=3"], r"argument 'n_layer=3' is not of the form --key=value"),
    (["--optimizer=mun"], r"optimizer='mun' is not one of adamw, muon \(did you mean muon\?\)"),
    (["--lr_schedule=linear"], r"lr_schedule='linear' is not one of cosine, wsd"),
    (["--muon_adjust_lr=rms"], r"muon_adjust_lr='rms' is not one of original, match_rms_adamw"),
    (["--cooldown_frac=0"], r"cooldown_frac=0.0 must be in \(0, 1\]"),
    (["--muon_lr=-1"], r"muon_lr=-1.0 must be positive"),
    (["--muon_momentum=1"], r"muon_momentum=1.0 must be in \[0, 1\)"),
    (["--muon_ns_steps=0"], r"muon_ns_steps=0 must be at least 1"),
    (["--arch=foo"], r"arch='foo' is not one of gpt2, llama"),
    (["--n_kv_head=3"], r"n_kv_head=3 does not divide n_head=4; pick n_kv_head from \[1, 2, 4\] \(0 means n_head\)"),
    (["--arch=llama", "--n_head=8", "--n_kv_head=3"], r"n_kv_head=3 does not divide n_head=8"),
    (["--position=rope", "--n_embd=120", "--n_head=8"], r"position=rope turns pairs of channels, but the head size "
                                                         r"n_embd/n_head = 120/8 = 15 is odd; pick n_head from \[1, 2"),
    (["--norm=batchnorm"], r"norm='batchnorm' is not one of layernorm, rmsnorm"),
    (["--max_minutes=-1"], r"max_minutes=-1.0 is negative"),
])
def test_invalid_values_are_rejected_with_the_value_and_a_fix(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(["--preset=tiny", *args])


def test_unknown_preset_names_the_choices():
    choices = "tiny, small, gpt2, gpt2-finetune, gpt2-medium, gpt2-large"
    with pytest.raises(ConfigError, match=rf"preset='huge' is not one of {choices}"):
        parse_args(["--preset=huge"])


def test_entry_point_options_parse_with_the_type_of_their_default():
    parsed = parse_args(["--preset=tiny", "--prompt=hi", "--top_k=5", "--stream=False"],
                        extra={"prompt": "", "top_k": 200, "stream": True})
    assert parsed.options == {"prompt": "hi", "top_k": 5, "stream": False}
    assert parsed.overridden == frozenset()


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_complete_and_valid(name):
    config = PRESETS[name]()
    config.preset = name
    config.validate()
    assert config.model.n_embd % config.model.n_head == 0


def test_small_preset_holds_the_well_known_numbers_and_about_30m_parameters():
    small = PRESETS["small"]()
    assert (small.model.n_layer, small.model.n_head, small.model.n_embd, small.model.block_size) == (6, 6, 384, 512)
    assert (small.train.batch_size, small.train.learning_rate, small.train.max_iters) == (16, 3e-4, 10000)
    assert 28e6 < count_parameters(small.model) < 32e6


def test_preset_sizes_grow_as_their_names_say():
    sizes = [count_parameters(PRESETS[n]().model) for n in ("tiny", "small", "gpt2", "gpt2-medium", "gpt2-large")]
    assert sizes == sorted(sizes)
    assert 340e6 < sizes[3] < 360e6 and 760e6 < sizes[4] < 780e6


def test_config_round_trips_through_a_dict():
    config = parse_args(["--preset=tiny", "--n_layer=3", "--dataset=x.txt"]).config
    again = Config.from_dict(config.to_dict())
    assert again == config


def test_fine_tuning_keeps_the_books_adamw_and_cosine_while_tiny_pretrains_with_muon():
    import classify
    import instruct
    tiny = PRESETS["tiny"]().train
    assert (tiny.optimizer, tiny.lr_schedule) == ("muon", "wsd")
    for script in (classify, instruct):
        config, _, _ = script.resolve_config(["--preset=tiny"])
        assert (config.train.optimizer, config.train.lr_schedule) == ("adamw", "cosine"), script.__name__
        config, _, _ = script.resolve_config(["--preset=tiny", "--optimizer=muon"])  # a user's choice still wins
        assert config.train.optimizer == "muon"


@pytest.mark.parametrize("script", ["classify", "instruct"])
@pytest.mark.parametrize("args, message", [
    (["--lora_rank=0"], r"lora_rank=0 must be 1 or more \(16 is the book's\), or leave it out to train every weight"),
    (["--lora_rank=-2"], r"lora_rank=-2 must be 1 or more"),
    (["--epochs=-1"], r"epochs=-1 must be 1 or more"),
    (["--test_fraction=0.9"], r"test_fraction=0.9 must be in \(0, 1\) and leave room for val_fraction="),
    (["--test_fraction=0"], r"test_fraction=0.0 must be in \(0, 1\)"),
])
def test_both_fine_tuning_scripts_reject_a_bad_shared_option_with_one_message(script, args, message):
    module = __import__(script)
    with pytest.raises(ConfigError, match=message):
        module.resolve_config(args)
    module.resolve_config([])  # and their defaults pass


def test_arch_sets_its_switches_in_one_word_and_options_beside_it_win():
    parsed = parse_args(["--preset=tiny", "--arch=llama", "--norm=layernorm"])
    model = parsed.config.model
    assert (model.arch, model.position, model.norm, model.mlp, model.n_kv_head, model.bias) == \
        ("llama", "rope", "layernorm", "swiglu", 2, False)  # tiny's 4 heads share 2 key/value heads
    assert parsed.overridden == {"arch", "norm"}  # what --arch set is not "given": a resume compares arch itself
    assert parse_args(["--preset=tiny", "--n_head=8", "--arch=llama"]).config.model.n_kv_head == 4  # after n_head


@pytest.mark.parametrize("name", list(PRESETS))
def test_gpt2_stays_the_default_form_everywhere(name):
    """Every preset is GPT-2's form, except that `tiny` (the CPU default) turns q and k by RoPE: the one switch that
    lowered bits per byte in its minutes (docs/architecture.md); --arch=gpt2 gives back learned positions."""
    model = PRESETS[name]().model
    position = "rope" if name == "tiny" else "learned"
    assert (model.arch, model.position, model.norm, model.mlp, model.n_kv_head, model.tie_embeddings) == \
        ("gpt2", position, "layernorm", "gelu", 0, True)
    assert parse_args([f"--preset={name}", "--arch=gpt2"]).config.model.position == "learned"


def test_a_checkpoint_config_from_before_the_switches_loads_as_gpt2():
    saved = parse_args(["--preset=tiny"]).config.to_dict()
    for new_field in ("arch", "position", "rope_theta", "norm", "mlp", "n_kv_head", "tie_embeddings"):
        del saved["model"][new_field]
    del saved["train"]["max_minutes"]
    config = Config.from_dict(saved)
    assert config.model == PRESETS["tiny"]().model.apply_arch()  # learned positions: GPT-2's, as before the switches
    assert config.train.max_minutes == 0


@pytest.mark.parametrize("script", ["classify", "instruct"])
def test_fine_tuning_schedule_never_rises_with_a_small_learning_rate(script):
    from train import learning_rate_at
    module = __import__(script)
    for rate in (5e-5, 1e-5):  # the book's rate, and a smaller one
        train = module.resolve_config([f"--learning_rate={rate}"])[0].train
        assert train.min_lr == pytest.approx(rate / 10)  # the script's own decay: a tenth of its rate at the end
        rates = [learning_rate_at(step, train.learning_rate, train.min_lr, train.warmup_iters, 500, train.lr_schedule,
                                  train.cooldown_frac) for step in range(train.warmup_iters, 500)]
        assert all(later <= earlier for earlier, later in zip(rates, rates[1:])), rate


@pytest.mark.parametrize("script", ["classify", "instruct"])
@pytest.mark.parametrize("option", ["--compile=True", "--sampling=epoch", "--zero_init_proj=True"])
def test_fine_tuning_refuses_a_training_option_it_would_ignore(script, option):
    module = __import__(script)
    with pytest.raises(ConfigError, match=f"^{option.partition('=')[0]}=.* has no effect here"):
        module.resolve_config([option])
