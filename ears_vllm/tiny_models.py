"""Tiny local target/draft model pairs for tests and offline demos (no model hub needed).

The target is a small random Llama with a byte-level BPE tokenizer trained on a few sentences; its
output layer is scaled up so that its next-token distributions are peaked, like a trained model's.
The draft is the target with noise added to every weight: close enough that drafts are often
accepted, different enough that acceptance is partial and policies can be told apart.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding lets a small draft model propose tokens that a large model verifies.",
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning.",
    "Write a short poem about the sea, the wind and the stars above the harbour.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Question: what is 12 times 7? Answer: 84. Question: what is 9 plus 10? Answer: 19.",
    "Once upon a time there was a little robot who wanted to learn how to paint.",
]


def build_tiny_pair(
    directory: str | Path,
    *,
    vocab_size: int = 384,
    hidden_size: int = 128,
    num_layers: int = 2,
    logit_scale: float = 12.0,
    draft_noise: float = 0.3,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``directory/target`` and ``directory/draft`` (HF format, float32); return their paths.

    Cached: an existing pair built with the same settings is reused.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        logit_scale=logit_scale,
        draft_noise=draft_noise,
        seed=seed,
    )
    target_dir, draft_dir, stamp = directory / "target", directory / "draft", directory / "settings.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return target_dir, draft_dir

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    real_vocab = tokenizer.get_vocab_size()

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=real_vocab,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=2,  # head_dim 64: vLLM CPU attention has no kernel for 16
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.token_to_id("<s>"),
        eos_token_id=tokenizer.token_to_id("</s>"),
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    target = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(logit_scale)
        # Make the end-of-sequence token rare so that generations run to max_tokens.
        target.lm_head.weight[config.eos_token_id].zero_()
    target.save_pretrained(target_dir, safe_serialization=True)
    hf_tokenizer.save_pretrained(target_dir)

    draft = LlamaForCausalLM(config).eval()
    draft.load_state_dict(target.state_dict())
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * draft_noise * parameter.std())
    draft.save_pretrained(draft_dir, safe_serialization=True)
    hf_tokenizer.save_pretrained(draft_dir)
    stamp.write_text(json.dumps(settings))
    return target_dir, draft_dir
