"""The main demo reads a document with a progress bar over its segments and prints the answer, time and memory."""

from __future__ import annotations

import re

import torch
from conftest import encode, tiny_classifier

from rmt_demo.demo import main, segment_progress


def test_the_progress_bar_counts_one_step_per_segment_and_leaves_the_outputs_alone(capsys):
    model = tiny_classifier()
    documents = encode([torch.arange(3, 3 + 37)])  # 37 tokens in segments of 8: 5 segments
    with torch.no_grad():
        plain = model(**documents).logits
        with segment_progress(model, 5) as bar:
            counted = model(**documents).logits
    assert bar.n == bar.total == 5 and torch.equal(plain, counted)
    assert not model.backbone._forward_pre_hooks  # the hook is gone afterwards
    assert "5/5" in capsys.readouterr().err


def test_the_demo_prints_the_answer_time_and_memory_after_a_full_bar(capsys):
    main(["--tokens", "700", "--seed", "1"])
    out, err = capsys.readouterr()
    segments = int(re.search(r"-> (\d+) segments", out)[1])
    assert segments == 7 and f"{segments}/{segments}" in err.replace("\r", "\n").splitlines()[-1]
    assert re.search(r"^answer: \w+ \(score 0\.\d+\): correct$", out, re.MULTILINE), out
    assert re.search(r"^time: [\d.]+ s", out, re.MULTILINE) and re.search(r"^peak RSS: [\d,]+ MiB", out, re.MULTILINE)
