import logging
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.common.tokenizer import PromptTokenizer, train_tokenizer
from quantvla_ros.models.pi0 import processor as pi0_processor
from quantvla_ros.models.pi0.processor import tokenize_prompt

pytestmark = pytest.mark.unit

TASKS = ["pick up the red cup", "open the top drawer", "put the block in the bowl", "close the window"]
TEXTS = [
    f"Task: {task}, State: {' '.join(str((i * 37 + k * 11) % 256) for k in range(8))};\nAction: "
    for i, task in enumerate(TASKS * 12)
] + TASKS


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sp")
    train_tokenizer(out, TEXTS, vocab_size=320)
    return out


@pytest.fixture(scope="module")
def json_dir(tmp_path_factory) -> Path:
    """A SentencePiece-style tokenizer.json: BPE over "▁" words, PaliGemma's special ids, BOS from a template."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=200,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=list("0123456789:,;\n▁"),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    out = tmp_path_factory.mktemp("hf")
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(params=["sentencepiece", "tokenizer.json"])
def tokenizer(request, sp_dir, json_dir) -> PromptTokenizer:
    return PromptTokenizer.from_dir(sp_dir if request.param == "sentencepiece" else json_dir)


def test_trained_sentencepiece_has_paligemma_ids_and_only_writes_the_model(sp_dir):
    assert [p.name for p in sp_dir.iterdir()] == ["tokenizer.model"]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    tok = PromptTokenizer.from_dir(sp_dir)
    assert (tok.bos_id, tok.pad_id, tok.vocab_size) == (2, 0, sp.get_piece_size())


def test_sentencepiece_encodes_digits_and_punctuation_without_unk(sp_dir):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    text = "Task: grab the Zebra, State: 0 9 128 255 7;\nAction: "  # "Z" never appears in training
    ids = PromptTokenizer.from_dir(sp_dir).encode(text, add_bos=False)
    assert 3 not in ids
    assert sp.decode(ids) == text
    assert len(sp.encode("\n")) == 1


def test_tokenizer_json_bos_is_added_once(json_dir):
    tok = PromptTokenizer.from_dir(json_dir)
    hf = Tokenizer.from_file(str(json_dir / "tokenizer.json"))
    assert (tok.bos_id, tok.pad_id) == (2, 0)
    assert tok.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    ids = tok.encode("pick up the cup", add_bos=True)
    assert ids == hf.encode("pick up the cup").ids  # the template adds the same single BOS
    assert ids.count(2) == 1 and ids[0] == 2
    assert tok.encode("pick up the cup", add_bos=False) == ids[1:]
    assert hf.decode(ids[1:]) == "pick up the cup"


def test_tokenizer_json_without_bos_is_rejected(tmp_path):
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="<bos>") as err:
        PromptTokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(err.value)


def test_missing_and_broken_tokenizer_files(tmp_path, sp_dir, json_dir):
    with pytest.raises(QuantVLAError) as err:
        PromptTokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "tokenizer.model" in str(err.value) and "tokenizer.json" in str(err.value)

    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid SentencePiece model") as err:
        PromptTokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.model") in str(err.value)

    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        PromptTokenizer.from_dir(tmp_path)


def test_sentencepiece_model_wins_when_both_files_exist(tmp_path, sp_dir, json_dir):
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer.json").write_text((json_dir / "tokenizer.json").read_text())
    both = PromptTokenizer.from_dir(tmp_path)
    assert both.vocab_size == PromptTokenizer.from_dir(sp_dir).vocab_size


def test_pi0_prompt_cleans_text_and_appends_newline_token(tokenizer):
    tokens, mask = tokenize_prompt(tokenizer, "  pick_up the\nred cup ", max_len=48, discrete_state=None)
    expected = tokenizer.encode("pick up the red cup", add_bos=True) + tokenizer.encode("\n", add_bos=False)
    assert tokens.dtype == np.int64 and mask.dtype == np.bool_
    assert tokens.shape == mask.shape == (48,)
    assert tokens[: len(expected)].tolist() == expected
    assert mask.sum() == len(expected) and mask[: len(expected)].all()
    assert (tokens[len(expected) :] == tokenizer.pad_id).all()


def test_pi05_prompt_carries_the_state(tokenizer):
    state = np.array([0, 9, 128, 255])
    tokens, mask = tokenize_prompt(tokenizer, "pick_up the red cup", max_len=200, discrete_state=state)
    expected = tokenizer.encode("Task: pick up the red cup, State: 0 9 128 255;\nAction: ", add_bos=True)
    assert tokens[mask].tolist() == expected
    pi0_tokens, pi0_mask = tokenize_prompt(tokenizer, "pick_up the red cup", max_len=200, discrete_state=None)
    assert tokens[mask].tolist() != pi0_tokens[pi0_mask].tolist()
    other, other_mask = tokenize_prompt(tokenizer, "pick_up the red cup", 200, np.array([0, 9, 128, 254]))
    assert other[other_mask].tolist() != tokens[mask].tolist()


def test_pi05_state_text_decodes_back(sp_dir):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tokens, mask = tokenize_prompt(PromptTokenizer.from_dir(sp_dir), "open it", 200, np.array([3, 17, 255]))
    assert tokens[0] == 2
    assert sp.decode(tokens[mask][1:].tolist()) == "Task: open it, State: 3 17 255;\nAction: "


def test_rejects_non_integer_state(tokenizer):
    with pytest.raises(ValueError, match="discretize_state"):
        tokenize_prompt(tokenizer, "go", 48, np.array([0.5, -0.2]))


def test_truncation_keeps_the_first_tokens_and_warns_once(tokenizer, monkeypatch, caplog):
    monkeypatch.setattr(pi0_processor, "_warned_truncation", False)
    full = tokenizer.encode("Task: put the block in the bowl, State: 1 2 3;\nAction: ", add_bos=True)
    max_len = len(full) - 3
    with caplog.at_level(logging.WARNING, logger=pi0_processor.__name__):
        for _ in range(3):
            tokens, mask = tokenize_prompt(tokenizer, "put the block in the bowl", max_len, np.array([1, 2, 3]))
    assert tokens.tolist() == full[:max_len] and mask.all()
    assert len([r for r in caplog.records if f"max_len={max_len}" in r.getMessage()]) == 1


def test_train_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(tmp_path, TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="no texts"):
        train_tokenizer(tmp_path, [], vocab_size=300)
    assert not list(tmp_path.iterdir())


class CountingTokenizer:
    """A PromptTokenizer that records every text it encodes."""

    def __init__(self, inner: PromptTokenizer) -> None:
        self.inner, self.texts = inner, []

    def encode(self, text: str, add_bos: bool) -> list[int]:
        self.texts.append(text)
        return self.inner.encode(text, add_bos)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@pytest.mark.parametrize("pi05", [False, True], ids=["pi0", "pi05"])
def test_the_instruction_is_tokenized_once_unless_the_prompt_carries_the_state(sp_dir, pi05):
    inner = PromptTokenizer.from_dir(sp_dir)
    counting = CountingTokenizer(inner)
    processor = pi0_processor.PI0Processor(pi0_processor.PI0Config(pi05=pi05, max_token_len=64), counting, "")
    states = [np.full(4, -0.5, dtype=np.float32), np.full(4, 0.5, dtype=np.float32)]
    first, _ = processor.prompt("open the top drawer", states[0])
    first[:] = -1  # callers own what they get: the cached tokens must not change with it
    again, again_mask = processor.prompt("open the top drawer", states[1])
    discrete = pi0_processor.discretize_state(states[1]) if pi05 else None
    expected, expected_mask = tokenize_prompt(inner, "open the top drawer", 64, discrete)
    np.testing.assert_array_equal(again, expected)
    np.testing.assert_array_equal(again_mask, expected_mask)
    # π0: the prompt's two pieces, once; π0.5: its one text per call, as the state changed.
    if pi05:
        assert len(counting.texts) == 2 and counting.texts[0] != counting.texts[1], counting.texts
    else:
        assert counting.texts == ["open the top drawer", "\n"]
