"""
A tiny byte-level BPE tokenizer with Qwen's special tokens, for CPU-sized models.

The CPU demo (zoom_world.py), the tests and bench.py need a tokenizer without any hub download.
It is Qwen2's tokenizer in miniature: the same pre-tokenizer (Qwen2's split regex, so digits are
single tokens, then byte-level), the same special tokens, eos <|im_end|> and pad <|endoftext|>;
byte-level, so any text encodes. Its merges are learnt from a corpus the caller gives
(zoom_world.tokenizer_corpus: the prompts and the zoom world's sentences), so those texts tokenize
compactly. Its own file (it was part of data.py) because nothing on the 7B path uses it: a real
checkpoint brings its tokenizer, and data.py reads any tokenizer folder alike.
"""

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast  # the tokenizer class only, no modeling code

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
# transformers' Qwen2TokenizerFast pre-tokenizer pattern
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def train_tokenizer(out_dir, corpus, vocab_size=1024):
    """Train a tiny tokenizer on `corpus` (a list of texts), save it with save_pretrained(out_dir),
    return it (a transformers PreTrainedTokenizerFast). Deterministic: the same corpus gives the
    same files on every run. vocab_size is an upper bound: training stops early when the corpus
    has no pair left to merge."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(SPECIAL_TOKENS[1:]), model_max_length=131072)
    fast.save_pretrained(out_dir)
    return fast
