"""The ClientApp of benchmarks/peers/flower_driver.py, in a module of its own: Ray's workers import it by name.

As Flower's PyTorch template does: a new model from the arrays the message brings, trained, and its arrays sent back
with `num-examples` for FedAvg's weighting. The training is the phone's whole local work (common.phone_work) for the
phone the message's config names; the phone's evaluation counts go back as metrics.
"""

from __future__ import annotations

import functools
from pathlib import Path

from common import phone_work
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from keyboard_model.architecture import build_model
from keyboard_model.model import ModelConfig
from keyboard_model.tokenizer import KeyboardTokenizer

client_app = ClientApp()


@functools.lru_cache(maxsize=1)
def tokenizer(path: str) -> KeyboardTokenizer:
    return KeyboardTokenizer.from_json(Path(path).read_text(encoding="utf-8"))


@client_app.train()
def train(message: Message, context: Context) -> Message:
    config = message.content["config"]
    words = tokenizer(config["tokenizer"])
    model = build_model(ModelConfig(vocab_size=words.vocab_size))
    model.load_state_dict(message.content["arrays"].to_torch_state_dict())
    work = phone_work(model, words, Path(config["phones-dir"]), config["phone"], config["now-s"], config["seed"],
                      config["evaluate"])
    evaluation = work.evaluation
    metrics = MetricRecord({"num-examples": work.result.num_examples,
                            "positions": evaluation.positions if evaluation else 0,
                            "hits-at-1": evaluation.hits_at_1 if evaluation else 0})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=message)
