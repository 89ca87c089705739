"""The Gemma tokenizer built from a SentencePiece vocabulary (pieces, scores, types), as a GGUF stores it.

Gemma's tokenizer is SentencePiece BPE with byte fallback and no dummy prefix. :func:`build_tokenizer` turns
such a vocabulary into a Hugging Face ``tokenizers.Tokenizer`` (a BPE whose merges reproduce SentencePiece's
score-ordered merging); :func:`tiny_vocab` is a toy vocabulary of the same kind for tests. The official
checkpoint ships a ready ``tokenizer.json`` instead (read in :mod:`qlab.models.gemma3.checkpoint`).

Example:
    >>> tok = build_tokenizer(*tiny_vocab(320))
    >>> tok.encode("the cat").tokens
    ['<bos>', 'the', '▁cat']
"""

from __future__ import annotations

from typing import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

__all__ = [
    "TOKEN_NORMAL",
    "TOKEN_UNKNOWN",
    "TOKEN_CONTROL",
    "TOKEN_USER_DEFINED",
    "TOKEN_UNUSED",
    "TOKEN_BYTE",
    "build_tokenizer",
    "tiny_vocab",
]

# SentencePiece / GGUF token types.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def _bpe_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """Merge list equivalent to SentencePiece BPE: SentencePiece repeatedly joins the adjacent pair whose
    concatenation is a normal piece with the highest score; a HF BPE does the same when every split of a
    normal piece into two normal pieces is a merge, ranked by the joined piece's score."""
    normal = {t for t, ty in zip(tokens, types) if ty == TOKEN_NORMAL}
    ranked = []
    for i, (t, s, ty) in enumerate(zip(tokens, scores, types)):
        if ty != TOKEN_NORMAL or len(t) < 2:
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in normal and right in normal:
                ranked.append((-float(s), i, k, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _hf_piece(token: str, ttype: int) -> str:
    # Whitespace-only user-defined pieces are stored with real spaces; text reaches the model with spaces
    # replaced by U+2581, so they are kept in that form (as transformers' GGUF converter does).
    if ttype == TOKEN_USER_DEFINED and token and token.strip(" ") == "":
        return "\u2581" * len(token)
    return token


def build_tokenizer(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], *, bos_id: int = 2,
                    eos_id: int = 1, unk_id: int = 3, pad_id: int = 0, add_bos: bool = True) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` for a Gemma (SentencePiece BPE, byte fallback, no dummy prefix) vocabulary.

    >>> toks, scores, types = tiny_vocab(320)
    >>> tok = build_tokenizer(toks, scores, types)
    >>> tok.decode(tok.encode("the cat").ids)
    'the cat'
    """
    pieces = [_hf_piece(t, ty) for t, ty in zip(tokens, types)]
    vocab = {}
    for i, p in enumerate(pieces):
        vocab.setdefault(p, i)
    merges = _bpe_merges(tokens, scores, types)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=pieces[unk_id], byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [AddedToken(p, special=True, normalized=False) for p, ty in zip(pieces, types)
                if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [AddedToken(p, special=False, normalized=("\u2581" in p)) for p, ty in zip(pieces, types)
            if ty == TOKEN_USER_DEFINED]
    tok.add_special_tokens(specials)
    tok.add_tokens(user)
    if add_bos:
        bos = pieces[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B:1",
                                                           special_tokens=[(bos, bos_id)])
    return tok


def tiny_vocab(vocab_size: int = 320):
    """(tokens, scores, types) of a toy Gemma-style vocabulary: control tokens, '\\n', 256 byte tokens, then
    normal pieces (single characters and a few merges, scored by merge rank), padded with <unusedN>.

    >>> tokens, scores, types = tiny_vocab(320)
    >>> len(tokens), tokens[:3], tokens[-1]
    (320, ['<pad>', '<eos>', '<bos>'], '<unused319>')
    """
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\n", "  "]
    types = [TOKEN_CONTROL] * 5 + [TOKEN_USER_DEFINED] * 2
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TOKEN_BYTE] * 256
    scores = [-1000.0] * 7 + [0.0] * 256
    merges = ["th", "he", "▁t", "the", "▁the", "at", "▁c", "▁cat", "in", "an", "er", "▁a"]
    chars = list("▁etaoinshrdlcumwfgypbvk.,T")
    normal = merges + chars
    for r, t in enumerate(normal):
        tokens.append(t)
        types.append(TOKEN_NORMAL)
        scores.append(-float(r))
    if len(tokens) > vocab_size:
        raise ValueError(f"tiny_vocab needs vocab_size >= {len(tokens)}")
    while len(tokens) < vocab_size:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(TOKEN_CONTROL)
        scores.append(-1000.0)
    return tokens, scores, types
