"""Put each response's rule rewards on the tokens the policy actually sampled.

The paper places R_item "at the last token of each item title" and 10 x R_list "on the ending token". Here an
item's title is a character span of the decoded response (`eval.parse.ParsedItem`: `end` is just past its last
character), and its reward goes on the first sampled token by which the whole title has been emitted: the
smallest j such that decode(tokens[:j+1]) starts with text[:end]. That is exact for any tokenisation:
- a token that spans the end of a title and what follows (")\\n", "t." ...) gets the reward, since it is the
  token that completes the title;
- a multi-byte character split over several byte tokens (byte-level BPE, SentencePiece byte fallback) is
  complete only with its last byte: a prefix that ends inside it decodes to U+FFFD, which does not match;
- the sampled ids need not be the tokenizer's canonical encoding of the text (a policy may spell "Heat" as
  "He" + "at"); nothing is re-encoded.
Prefixes are decoded on demand in a binary search (the predicate only turns from false to true as j grows), so
an item costs about log2(length) decodes.

The official code instead re-renders the parsed list as new text and token ids (so the policy is trained on
tokens it never sampled, and numbering or format errors are never penalised) and finds item ends by the literal
Llama-2 newline id 13 after skipping the system prompt's newlines. Neither is done here: the text is only ever
decoded from the sampled ids, and the positions come from character offsets.

`decode` must be the function the text was produced with, with special tokens skipped and no clean-up of
spaces (e.g. `partial(tok.decode, skip_special_tokens=True, clean_up_tokenization_spaces=False)`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Decode = Callable[[Sequence[int]], str]


def completing_token(tokens: Sequence[int], decode: Decode, text: str, char_end: int) -> int:
    """Index of the first token by which text[:char_end] (char_end >= 1) has been fully emitted."""
    if not 1 <= char_end <= len(text):
        raise ValueError(f"character end {char_end} is outside the response text (length {len(text)})")
    target = text[:char_end]
    lo, hi = 0, len(tokens) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if decode(tokens[: mid + 1]).startswith(target):
            hi = mid
        else:
            lo = mid + 1
    return lo


def place_rewards(tokens: Sequence[int], decode: Decode, text: str, item_ends: Sequence[int],
                  item_rewards: Sequence[float], list_reward: float, width: int) -> np.ndarray:
    """Per-token scores [width] of one response of len(tokens) sampled tokens (the stop token included).

    R_item of item i goes on `completing_token(..., item_ends[i])`, the list reward on the last sampled token;
    rewards that land on the same token add up. `text` must be decode(tokens) (checked).
    """
    tokens = list(tokens)
    if not tokens:
        raise ValueError("place_rewards: a response has at least one sampled token")
    if len(tokens) > width:
        raise ValueError(f"place_rewards: {len(tokens)} tokens do not fit in width {width}")
    if len(item_ends) != len(item_rewards):
        raise ValueError(f"place_rewards: {len(item_ends)} item ends but {len(item_rewards)} item rewards")
    if decode(tokens) != text:
        raise ValueError("place_rewards: text is not the decoding of the sampled tokens (decode it with the "
                         "same function; never re-render it)")
    scores = np.zeros(width, np.float32)
    for end, reward in zip(item_ends, item_rewards):
        scores[completing_token(tokens, decode, text, end)] += reward
    scores[len(tokens) - 1] += list_reward
    return scores
