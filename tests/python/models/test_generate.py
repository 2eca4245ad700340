"""Generation (tessera.models.generate, `tessera generate`): greedy tokens equal transformers' generate on tiny
random models (the Mistral one's sliding window is shorter than prompt + generation), the KV cache equals
recomputing the whole sequence, sampling is repeatable and draws from the nucleus, a checkpoint saved by 2
sharded ranks generates what the HF model does, and bad input gets a clear error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hf_tiny import CONFIGS, VOCAB, make

import tessera
import tessera.models as tm
from conftest import run_ranks
from tessera import cli
from tessera.errors import CheckpointError, InvalidArgumentError
from tessera.models.generate import eos_token_ids, generate, generate_tokens, load_model, next_token

PROMPT, NEW = 8, 32  # 8 + 32 positions: well past the Mistral model's window of 5


def _prompt(seed=1, batch=2, length=PROMPT):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and with more runnable threads than cores (other jobs on a
    2-core machine) OpenMP's spinning workers made one greedy comparison take 24 s instead of 0.2 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (HF directory, the transformers model saved there)."""
    root = tmp_path_factory.mktemp("hf")
    return {name: (root / name, make(name, root / name)) for name in CONFIGS}


def _hf_generate(ref, prompt, eos=None, new=NEW):
    import transformers

    # eos_token_id None: transformers cannot stop early either (the tiny configs name eos 2).
    gc = transformers.GenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=eos,
                                       pad_token_id=eos[0] if eos is not None else 0)
    with torch.no_grad():
        return ref.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gc)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_equals_transformers_generate(name, hf_models):
    d, ref = hf_models[name]
    prompt = _prompt()
    want = _hf_generate(ref, prompt)
    assert want.shape == (2, PROMPT + NEW)
    got = generate_tokens(tm.load_hf(d), prompt, max_new_tokens=NEW)
    assert got.dtype == torch.int64 and torch.equal(got, want), (got, want)


def test_sliding_window_changes_the_generated_tokens(hf_models):
    """The window matters for these tokens, so the Mistral case above checks that the cached decode honours it."""
    d, _ = hf_models["mistral_sliding_window"]
    model = tm.load_hf(d)
    windowed = generate_tokens(model, _prompt(), max_new_tokens=NEW)
    for layer in model.layers:
        layer.attention.window = None
    assert not torch.equal(generate_tokens(model, _prompt(), max_new_tokens=NEW), windowed)


def test_rows_stop_at_eos_like_transformers(hf_models):
    """A row that produced EOS is padded with it, the others go on, and generation stops when all have ended;
    transformers with pad = eos is the reference."""
    d, ref = hf_models["llama_gqa_untied_rope_scaling"]
    model = tm.load_hf(d)
    prompt = _prompt(seed=3)
    free = generate_tokens(model, prompt, max_new_tokens=NEW)
    eos = [int(free[0, PROMPT + 4]), VOCAB - 1]  # row 0 ends after 5 new tokens
    want = _hf_generate(ref, prompt, eos=eos)
    got = generate_tokens(model, prompt, max_new_tokens=NEW, eos_token_id=eos)
    assert torch.equal(got, want), (got, want)
    assert (got[0, PROMPT + 5:] == eos[0]).all() and got[1, PROMPT + 5] not in eos  # row 1 went on
    alone = generate_tokens(model, prompt[:1], max_new_tokens=NEW, eos_token_id=eos)
    assert torch.equal(alone, free[:1, :PROMPT + 5])  # every row ended: no forward past the EOS


def _left_padded(prompts, pad_id=0):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p.tolist() for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("name", ["llama_gqa_untied_rope_scaling", "mistral_sliding_window"])
def test_left_padded_batch_rows_equal_each_prompt_alone_and_transformers(name, hf_models):
    """Prompts of 8, 3 and 6 tokens in one batch, padded on the left with an attention mask: each row continues as
    its prompt does alone (positions from its first token, pad slots never attended; the Mistral window of 5 is
    shorter than the longest prompt), and the batch equals transformers' left-padded one. Before the mask was
    honoured the 3-token row agreed with its solo continuation in 1 of 12 tokens."""
    import transformers

    d, ref = hf_models[name]
    model = tm.load_hf(d)
    prompts = [_prompt(seed=11, batch=1, length=n)[0] for n in (8, 3, 6)]
    ids, mask = _left_padded(prompts, pad_id=VOCAB - 1)  # a pad id that the model would attend to if it could
    new = 16
    got = generate_tokens(model, ids, attention_mask=mask, max_new_tokens=new)
    for row, p in enumerate(prompts):
        alone = generate_tokens(model, p[None], max_new_tokens=new)
        assert torch.equal(got[row, ids.shape[1] - len(p):], alone[0]), (row, got[row], alone[0])
    # transformers stops rows at the config's eos 2 (None does not unset it): the same EOS on both sides.
    gc = transformers.GenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=2, pad_token_id=2)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, generation_config=gc)
    got = generate_tokens(model, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=2)
    assert torch.equal(got, want), (got, want)
    assert torch.equal(generate_tokens(model, ids, attention_mask=torch.ones_like(mask), max_new_tokens=new),
                       generate_tokens(model, ids, max_new_tokens=new))  # an all-ones mask changes nothing


def test_attention_mask_must_be_left_padding(hf_models):
    model = tm.load_hf(hf_models["mistral_sliding_window"][0])
    ids = _prompt(batch=2, length=4)
    for mask, words in (([[1, 1, 0, 0], [1, 1, 1, 1]], "row 0 of attention_mask is [1, 1, 0, 0]; expected left pad"),
                        ([[0, 1, 0, 1], [1, 1, 1, 1]], "row 0"), ([[1, 1, 1, 1], [0, 0, 0, 0]], "row 1"),
                        ([[1, 1, 1, 2], [1, 1, 1, 1]], "0 (pad) and 1 (token) only"),
                        ([[1, 1, 1], [1, 1, 1]], "attention_mask has shape (2, 3); expected input_ids' (2, 4)")):
        with pytest.raises(InvalidArgumentError) as e:
            generate_tokens(model, ids, attention_mask=torch.tensor(mask), max_new_tokens=2)
        assert words in str(e.value), e.value


@pytest.mark.parametrize("name", ["llama_mha_tied_head_dim", "mistral_sliding_window"])
def test_kv_cache_decode_equals_recomputing_the_sequence(name, hf_models):
    model = tm.load_hf(hf_models[name][0])
    prompt = _prompt(seed=5)
    seq = prompt
    with torch.no_grad():
        for _ in range(NEW):  # no cache: the whole sequence each step
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate_tokens(model, prompt, max_new_tokens=NEW), seq)


def test_sampling_is_repeatable_and_tiny_top_p_is_greedy(hf_models):
    model = tm.load_hf(hf_models["llama_gqa_untied_rope_scaling"][0])
    prompt = _prompt()

    def sample(seed, **kw):
        return generate_tokens(model, prompt, max_new_tokens=NEW, temperature=1.0,
                               generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    greedy = generate_tokens(model, prompt, max_new_tokens=NEW)
    assert not torch.equal(sample(7), greedy)
    assert torch.equal(sample(7, top_p=1e-9), greedy)


def test_sampling_draws_from_the_nucleus():
    """probabilities 0.5, 0.3, 0.15, 0.05 with top_p 0.7: the nucleus is the first two (0.5 < 0.7 <= 0.8),
    renormalised to 0.625 / 0.375; temperature 2 flattens them to softmax(log p / 2)."""
    p = torch.tensor([0.05, 0.5, 0.15, 0.3])  # not in rank order, so the un-sorting is checked too
    n, g = 20000, torch.Generator().manual_seed(0)
    logits = p.log().expand(n, 4)
    freq = torch.bincount(next_token(logits, 1.0, 0.7, g), minlength=4).float() / n
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.625, 0.0, 0.375]), rtol=0, atol=0.015)
    freq = torch.bincount(next_token(logits, 2.0, 1.0, g), minlength=4).float() / n
    torch.testing.assert_close(freq, torch.softmax(p.log() / 2, 0), rtol=0, atol=0.015)


def test_bad_arguments_are_rejected(hf_models):
    model = tm.load_hf(hf_models["mistral_sliding_window"][0])  # max_seq_len 128
    prompt = _prompt()
    for kw, words in ((dict(temperature=-0.5), "temperature must be >= 0"), (dict(temperature=float("nan")), "tempe"),
                      (dict(top_p=0.0), "top_p must be in (0, 1]"), (dict(top_p=1.5), "top_p"),
                      (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
                      (dict(max_new_tokens=121), "= 129 tokens exceeds the model's max_seq_len (128)")):
        with pytest.raises(InvalidArgumentError) as e:
            generate_tokens(model, prompt, **{"max_new_tokens": 4, **kw})
        assert words in str(e.value), e.value
    assert generate_tokens(model, prompt, max_new_tokens=120).shape == (2, 128)  # exactly the context fits
    with pytest.raises(InvalidArgumentError, match="input_ids must be int64"):
        generate_tokens(model, prompt[:, :0], max_new_tokens=1)


# ---- loading from a checkpoint --------------------------------------------------------------------------------

def _save_sharded(rank, world, dirs):
    for hf_dir, root in dirs:
        model = tm.load_hf(hf_dir, shard=True)  # each rank holds half of every unit
        opt = tessera.optim.AdamW(model.parameters())  # other entries are ignored by load_model
        tessera.checkpoint.Checkpointer(root).save(
            12, {"model": model, "optim": opt, "hf_config": tm.hf_config(model)}).wait()


@pytest.fixture(scope="module")
def sharded_checkpoints(hf_models, tmp_path_factory):
    """name -> Checkpointer root saved by 2 sharded gloo ranks from that HF directory (tied head; window)."""
    root = tmp_path_factory.mktemp("ckpt")
    names = ["llama_mha_tied_head_dim", "mistral_sliding_window"]
    dirs = [(str(hf_models[n][0]), str(root / n)) for n in names]
    run_ranks(2, _save_sharded, dirs)
    return {n: root / n for n in names}


@pytest.mark.parametrize("name", ["llama_mha_tied_head_dim", "mistral_sliding_window"])
def test_checkpoint_of_two_sharded_ranks_generates_like_the_hf_model(name, hf_models, sharded_checkpoints):
    want = generate_tokens(tm.load_hf(hf_models[name][0]), _prompt(), max_new_tokens=NEW)
    root = sharded_checkpoints[name]
    for path in (root, root / "step-0000000012"):
        model, model_dir = load_model(path)
        assert model_dir is None and type(model).__name__ == ("Mistral" if "mistral" in name else "Llama")
        assert torch.equal(generate_tokens(model, _prompt(), max_new_tokens=NEW), want)
    model, _ = load_model(root, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_loading_leaves_a_save_in_progress_alone(sharded_checkpoints, tmp_path):
    """Generating from the checkpoints of a job that is still training must not delete the save it is writing
    (Checkpointer(root) removes every .tmp-* directory: stale for a trainer, live for a reader)."""
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(sharded_checkpoints["mistral_sliding_window"], root)
    in_progress = root / ".tmp-step-0000000013"
    in_progress.mkdir()
    (in_progress / "rank-00000.bin").write_bytes(b"\0" * 64)
    load_model(root)
    assert (in_progress / "rank-00000.bin").is_file()


def test_bfloat16_checkpoint_loads_in_the_dtype_asked_for(hf_models, tmp_path):
    """Built in the dtype the checkpoint stores (the checkpointer accepts no other), then converted; the dtype
    'hf_config' names is an export choice (hf_config(model, dtype=...)) and may differ."""
    model = tm.load_hf(hf_models["llama_gqa_untied_rope_scaling"][0], dtype=torch.bfloat16)
    tessera.checkpoint.Checkpointer(tmp_path).save(
        3, {"model": model, "hf_config": tm.hf_config(model, dtype=torch.float32)}).wait()
    loaded, _ = load_model(tmp_path, dtype=torch.float32)
    want = {k: v.float() for k, v in model.state_dict().items()}
    got = loaded.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_load_model_names_what_it_expected(tmp_path, hf_models):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for path in (tmp_path / "missing", tmp_path / "empty", tmp_path / "file.txt"):
        with pytest.raises(InvalidArgumentError) as e:
            load_model(path)
        assert str(path) in str(e.value) and "Hugging Face model directory" in str(e.value), e.value
    # A checkpoint without the model's config: the error says how to save one.
    model = tm.load_hf(hf_models["llama_mha_tied_head_dim"][0])
    tessera.checkpoint.Checkpointer(tmp_path / "noconf").save(1, {"model": model}).wait()
    with pytest.raises(CheckpointError, match="no 'hf_config' entry.*tessera.models.hf_config"):
        load_model(tmp_path / "noconf")


# ---- the command line -----------------------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _write_tokenizer(d):
    """A word-level tokenizer whose 96 ids fit the tiny models: specials 0-4 (</s> = 2, the configs' eos), some
    words, then w0, w1, ...; a ChatML-like chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    words = ["user", "assistant", "hello", "world", "why", "is", "the", "sky", "blue"]
    vocab = specials + words + [f"w{i}" for i in range(VOCAB - len(specials) - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=specials[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(d)


def _run_cli(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tessera", "generate", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=env)


def test_cli_generates_text_from_an_hf_directory(hf_models):
    import transformers

    d = hf_models["llama_gqa_untied_rope_scaling"][0]
    _write_tokenizer(d)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    text = tok.apply_chat_template([{"role": "user", "content": "why is the sky blue"}], tokenize=False,
                                   add_generation_prompt=True)
    assert tok.convert_ids_to_tokens(tok(text, add_special_tokens=False).input_ids) == [
        "<|im_start|>", "user", "why", "is", "the", "sky", "blue", "<|im_end|>", "<|im_start|>", "assistant"]
    want = generate(tm.load_hf(d), tok, "why is the sky blue", chat=True, max_new_tokens=12)
    assert want.split() and all(w in tok.get_vocab() for w in want.split())
    r = _run_cli(d, "--prompt", "why is the sky blue", "--chat", "--max-new-tokens", 12)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    assert "prefill" in r.stderr and "tokens/s" in r.stderr


def test_chat_stops_at_an_eos_that_only_generation_config_names(hf_models, tmp_path):
    """A chat model's end-of-turn id is often an EOS only in generation_config.json (Llama 3's <|eot_id|>): the
    model load_hf returns carries it, and generate() stops there as transformers' generate does on the same
    directory. Before, generate() knew only the tokenizer's eos and ran to max_new_tokens. A list of prompts gives
    what each prompt gives alone."""
    import json
    import shutil

    import transformers

    d = tmp_path / "chat"
    shutil.copytree(hf_models["llama_gqa_untied_rope_scaling"][0], d)
    _write_tokenizer(d)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    question = "why is the sky blue"
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    free = generate_tokens(tm.load_hf(d), ids, max_new_tokens=12)[0, ids.shape[1]:].tolist()
    n = next(k for k in range(1, 10) if free[k] not in free[:k] + [2])  # the first new id after the first token
    end_of_turn = free[n]  # ends the reply after n + 1 tokens
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, end_of_turn]}))

    ref = transformers.AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                            pad_token_id=2)[0, ids.shape[1]:].tolist()
    assert want == free[:n + 1]  # transformers stopped at the end-of-turn id
    model = tm.load_hf(d)
    assert model.generation_config["eos_token_id"] == [2, end_of_turn]
    stats: dict = {}
    got = generate(model, tok, question, chat=True, max_new_tokens=12, stats=stats)
    assert stats["new_tokens"] == n + 1 and got == tok.decode(want[:n], skip_special_tokens=True), (got, stats)
    assert generate(model, tok, question, chat=True, max_new_tokens=12, eos_token_id=2) != got  # explicit wins
    checkpoint_model, _ = load_model(d)  # the same rule for every loader
    assert eos_token_ids(tok, model=checkpoint_model) == sorted([2, end_of_turn])
    other = "hello"
    assert generate(model, tok, [question, other], chat=True, max_new_tokens=12) == [
        got, generate(model, tok, other, chat=True, max_new_tokens=12)]
    # An export without a source directory keeps the generation config, so the exported model stops there too.
    tm.save_hf(model, tmp_path / "export")
    assert tm.load_hf(tmp_path / "export").generation_config["eos_token_id"] == [2, end_of_turn]
    assert json.loads((tmp_path / "export" / "generation_config.json").read_text()) == model.generation_config


def test_cli_bad_path_exits_2_naming_it(tmp_path):
    r = _run_cli(tmp_path / "nowhere", "--prompt", "hello")
    assert r.returncode == 2 and str(tmp_path / "nowhere") in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_checkpoint_needs_a_tokenizer_dir(sharded_checkpoints, hf_models, capsys):
    name = "mistral_sliding_window"
    d = hf_models[name][0]
    _write_tokenizer(d)
    ckpt = str(sharded_checkpoints[name])
    common = ["--prompt", "hello world", "--max-new-tokens", "6", "--device", "cpu"]
    assert cli.main(["generate", ckpt, *common]) == 2
    assert "give --tokenizer DIR" in capsys.readouterr().err
    assert cli.main(["generate", ckpt, "--tokenizer", str(d), *common]) == 0
    from_ckpt = capsys.readouterr().out
    assert cli.main(["generate", str(d), *common]) == 0
    assert capsys.readouterr().out == from_ckpt and from_ckpt.endswith("\n")


def _generate_mixed_precision(rank, world, hf_dir, out_file):
    mp = tessera.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = tm.load_hf(hf_dir, dtype=torch.float32, shard=True, mixed_precision=mp)  # fp32 shards, bf16 compute
    got = generate_tokens(model, _prompt(), max_new_tokens=12)
    if rank == 0:
        torch.save(got, out_file)


def test_sharded_model_with_bf16_compute_generates(hf_models, tmp_path):
    """Seen first on an H200 at the end of a `tessera run` (bf16 mixed precision): the KV cache was allocated in
    the parameters' dtype (fp32 shards) while keys were computed in bf16, and SDPA refused the mix. The reference:
    the plain model cast to bf16 (the same bf16 weights and math, unsharded)."""
    hf_dir, _ = hf_models["llama_gqa_untied_rope_scaling"]
    out = tmp_path / "tokens.pt"
    run_ranks(2, _generate_mixed_precision, hf_dir, str(out))
    ref = tm.load_hf(hf_dir, dtype=torch.bfloat16)
    assert torch.equal(torch.load(out), generate_tokens(ref, _prompt(), max_new_tokens=12))
