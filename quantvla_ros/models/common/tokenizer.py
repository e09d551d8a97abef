"""Text tokenizers read from a checkpoint folder: a SentencePiece model or an HF tokenizer.json."""

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import tokenizers

from quantvla_ros.atomic import write_bytes_atomic
from quantvla_ros.errors import QuantVLAError

SENTENCEPIECE_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
# PaliGemma's special token ids.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3


def special_token_content(entry: str | dict | None) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken dict."""
    return entry.get("content") if isinstance(entry, dict) else entry


def tokenizer_file(path: Path) -> Path:
    """`tokenizer.model` (openpi's PaliGemma SentencePiece) or else `tokenizer.json` (LeRobot / HF)."""
    path = Path(path)
    for name in (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE):
        if (path / name).is_file():
            return path / name
    raise QuantVLAError(f"No tokenizer in {path}; put the PaliGemma {SENTENCEPIECE_FILE} or {HF_TOKENIZER_FILE} there.")


@dataclass(frozen=True)
class PromptTokenizer:
    """Text to token ids, with BOS added by us so both file formats behave the same."""

    encode_text: Callable[[str], list[int]]  # no special tokens
    bos_id: int
    pad_id: int
    vocab_size: int

    @classmethod
    def from_dir(cls, path: Path) -> "PromptTokenizer":
        file = tokenizer_file(path)
        if file.name == SENTENCEPIECE_FILE:
            return cls._from_sentencepiece(file)
        return cls._from_tokenizer_json(file)

    @classmethod
    def _from_sentencepiece(cls, file: Path) -> "PromptTokenizer":
        try:
            sp = sentencepiece.SentencePieceProcessor(model_proto=file.read_bytes())
        except RuntimeError as e:
            raise QuantVLAError(f"{file} is not a valid SentencePiece model ({e}); replace it.") from None
        if sp.bos_id() < 0:
            raise QuantVLAError(f"SentencePiece model {file} defines no BOS token; use the PaliGemma tokenizer.")
        return cls(
            encode_text=sp.encode,
            bos_id=sp.bos_id(),
            # pad_id() is -1 when the model defines none; openpi pads with 0 regardless.
            pad_id=sp.pad_id() if sp.pad_id() >= 0 else PAD_ID,
            vocab_size=sp.get_piece_size(),
        )

    @classmethod
    def _from_tokenizer_json(cls, file: Path) -> "PromptTokenizer":
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise QuantVLAError(f"{file} is not a valid tokenizer.json ({e}); replace it.") from None
        # Gemma's tokenizer.json adds BOS through its post-processor; we encode without special
        # tokens and prepend the id ourselves, so look it up by name.
        bos_id = tok.token_to_id("<bos>")
        if bos_id is None:
            raise QuantVLAError(f"{file} has no <bos> token; use the PaliGemma tokenizer.json or tokenizer.model.")
        pad_id = tok.token_to_id("<pad>")
        return cls(
            encode_text=lambda text: tok.encode(text, add_special_tokens=False).ids,
            bos_id=bos_id,
            pad_id=PAD_ID if pad_id is None else pad_id,
            vocab_size=tok.get_vocab_size(with_added_tokens=True),
        )

    def encode(self, text: str, add_bos: bool) -> list[int]:
        return ([self.bos_id] if add_bos else []) + list(self.encode_text(text))


def train_tokenizer(out_dir: Path, texts: list[str], vocab_size: int) -> Path:
    """Train a small PaliGemma-style SentencePiece model on `texts` and write `out_dir/tokenizer.model`.

    The real PaliGemma tokenizer cannot be downloaded everywhere, so small project-trained policies
    and tests use this one. It copies PaliGemma's special ids and normalizer settings (BPE, byte
    fallback, split digits, no whitespace rewriting), so every character, including the state
    digits and the prompt's "\\n", encodes to real pieces instead of <unk>.
    """
    if not texts:
        raise ValueError("train_tokenizer got no texts; pass at least one training sentence.")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            bos_id=BOS_ID,
            unk_id=UNK_ID,
            byte_fallback=True,
            split_digits=True,
            user_defined_symbols=["\n"],  # PaliGemma has "\n" as a single piece too
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            hard_vocab_limit=False,  # a small corpus may not fill the vocabulary; that is fine
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"Could not train a tokenizer with vocab_size={vocab_size} ({e}); "
            "raise vocab_size (byte fallback alone takes 261 ids plus one per distinct character)."
        ) from None
    out = Path(out_dir) / SENTENCEPIECE_FILE
    write_bytes_atomic(out, model.getvalue())
    return out
