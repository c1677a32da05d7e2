"""Regenerate `tiny_tokenizer.json`: a 512-id byte-level BPE with the released special token strings.

Run once (output committed): `python vlmcook/data/assets/make_tiny_tokenizer.py`.
Layout: the special tokens first (ids 0..25, `<unk>` 0, `<|endoftext|>` 1, `<|im_end|>` 2 to match the `tiny`
preset's bos/eos), then the 256 byte symbols, then merges learnt from the text below up to 512 ids in total.
The text is written for this script: chat-shaped English, some Chinese, code and digits, so that the tokens the
chat template uses often (`user`, `assistant`, `\\n\\n`, ...) become single ids.
"""

from pathlib import Path

import tokenizers
from tokenizers import AddedToken, pre_tokenizers, trainers
from tokenizers.models import BPE

from vlmcook.data.tokenizer import NOT_SPECIAL, qwen2_pipeline

VOCAB_SIZE = 512
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_end|>", "<|im_start|>", "<think>", "</think>", "<image>", "</image>",
            "<slice>", "</slice>", "<image_id>", "</image_id>", "<ref>", "</ref>", "<box>", "</box>", "<quad>",
            "</quad>", "<point>", "</point>", "<unit>", "</unit>", "<tool_call>", "</tool_call>", "<tool_response>",
            "</tool_response>"]

TEXT = """\
system
You are a helpful assistant that looks at images and videos and answers questions about them.
user
What is in this image? Describe the picture in one sentence.
assistant
The image shows a small red house next to a river, with two trees and a blue sky.

user
How many people are standing on the bridge?
assistant
There are three people on the bridge. One of them is holding an umbrella.

user
Read the text on the sign and tell me what it says.
assistant
The sign says: "Welcome to the city library. Open from 9 to 18 every day."

user
What happens in this video? Give the time of each event.
assistant
At 0.5 seconds a dog runs into the frame; at 3.2 seconds it jumps over the fence and the video ends at 6.0 s.

user
Think step by step. What is 12 + 35?
assistant
Let me think. 12 plus 35 is 47, so the answer is 47.

The quick brown fox jumps over the lazy dog. A picture is worth a thousand words, and a video is worth more.
This is a document with a title, a table and a chart. The table has four rows and three columns.
Question: which country has the largest population? Answer: the table says it is the first row.

这是一张图片。图片里有一只猫和一只狗。请描述这个视频的内容。
用户问了一个问题，助手给出了回答。今天天气很好，我们去公园散步。

def preprocess(image, size=448):
    width, height = image.size
    for row in range(rows):
        for col in range(cols):
            crop = image.crop((col * width, row * height, (col + 1) * width, (row + 1) * height))
    return [normalize(view) for view in views]

class Model(nn.Module):
    def forward(self, x):
        return self.proj(torch.relu(self.fc(x)))

{"role": "user", "content": "Hello!"} [1, 2, 3, 4, 5] 0123456789 3.14159 2024-05-01 100%
"""


def main() -> None:
    tok = qwen2_pipeline(tokenizers.Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False)))
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    # Re-declare the added tokens with the released `special` flags (<think> and tool tags are not special).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS if t not in NOT_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in SPECIALS if t in NOT_SPECIAL])
    for i, t in enumerate(SPECIALS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    out = Path(__file__).resolve().parent / "tiny_tokenizer.json"
    tok.save(str(out))
    print(f"wrote {out} ({tok.get_vocab_size()} ids)")


if __name__ == "__main__":
    main()
