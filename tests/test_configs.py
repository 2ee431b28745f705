"""Every config file loads with each documented arg string; mistyped keys fail loudly."""

import importlib
import os

import pytest

ARGS = {
    "text_classification": ["", "smoke", "local", "local,smoke", "mrpc", "cola,local", "stsb,local",
                            "rte,local,smoke", "sst2,model=bert-base-cased", "local,steps=10"],
    "token_classification": ["", "smoke", "local", "local,smoke", "label_all_tokens,local",
                             "model=bert-base-cased", "local,steps=10"],
    "multiple_choice": ["", "smoke", "local", "local,smoke", "model=bert-base-cased",
                        "local,steps=10"],
    "qa": ["", "smoke", "local", "local,smoke", "v2", "v2,smoke", "model=bert-base-cased",
           "local,steps=10"],
    "mlm": ["", "smoke", "local", "local,smoke", "wwm", "line_by_line,local", "scratch,smoke",
            "local,wwm", "wwm,model=bert-base-cased",
            "local,steps=10"],
    "clm": ["", "smoke", "local", "local,smoke", "tinyshakespeare,local", "local,per_document",
            "tinyshakespeare,local,per_document,smoke", "scratch,smoke", "model=bert-base-cased",
            "local,model=bert-base-cased", "local,steps=10", "local,family=llama",
            "local,family=qwen3,smoke"],
    "sft": ["", "smoke", "local", "local,smoke", "local,gsm8k", "local,family=gpt2,smoke",
            "model=bert-base-cased", "local,model=bert-base-cased", "local,steps=10"],
    "translation": ["", "smoke", "local", "local,smoke", "local,newstest", "local,multi30k",
                    "local,family=bart", "local,family=marian,smoke", "local,family=t5", "scratch,smoke",
                    "model=bert-base-cased", "local,model=bert-base-cased", "local,steps=10"],
    "summarization": ["", "smoke", "local", "local,smoke", "local,family=t5", "xsum,smoke",
                      "local,family=marian", "scratch,smoke", "model=bert-base-cased",
                      "local,steps=10"],
}

# Config files named after HF's example scripts rather than their task.
CONFIG_TASKS = {"qa": "question_answering", "mlm": "masked_lm", "clm": "causal_lm"}
SEQ2SEQ = ("translation", "summarization")


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in ARGS.items() for a in args])
def test_config_loads(name, arg, request):
  if name in SEQ2SEQ and "local" in arg and "model=" not in arg:
    request.getfixturevalue("data_dir")  # trains a tokenizer on the local data: skip without it
  cfg = importlib.import_module(f"configs.{name}").get_config(arg)
  assert cfg.task == CONFIG_TASKS.get(name, name)
  assert cfg.train.batch_size > 0 and cfg.data.max_length > 0
  if "smoke" in arg:
    assert cfg.train.steps <= 10
  if "local" in arg:
    assert cfg.data.train_file and cfg.data.dataset is None
    if name in ("clm", "sft") and "model=" not in arg:  # from scratch: a config and a tokenizer
      family = arg.split("family=")[1].split(",")[0] if "family=" in arg else (
          "gpt2" if name == "clm" else "llama")
      assert cfg.model.name_or_path is None and cfg.model.from_scratch
      assert cfg.model.config_name == family
      assert ("n_layer=" if family == "gpt2" else "num_key_value_heads=") in cfg.model.config_overrides
      if family != "gpt2":  # the heads split the hidden size (Qwen3's head_dim defaults to 128)
        import transformers
        model_config = transformers.AutoConfig.for_model(family)
        model_config.update_from_string(cfg.model.config_overrides)
        assert model_config.head_dim * model_config.num_attention_heads == model_config.hidden_size
      assert os.path.isfile(os.path.join(cfg.model.tokenizer, "tokenizer.json"))
      if name == "sft":
        assert cfg.data.chat_template == "default" and cfg.data.packing
        assert ("gsm8k" if "gsm8k" in arg else "gpteacher") in cfg.data.train_file
    elif name in SEQ2SEQ and "model=" not in arg:  # from scratch, a tokenizer trained on train
      family = "marian" if "marian" in arg else "t5" if "t5" in arg else "bart"
      assert cfg.model.name_or_path is None and cfg.model.from_scratch
      assert cfg.model.config_name == family and "d_model=" in cfg.model.config_overrides
      assert os.path.basename(cfg.model.tokenizer).startswith(f"{family}-tokenizer-")
      assert os.path.isfile(os.path.join(cfg.model.tokenizer, "tokenizer.json"))
      assert cfg.data.max_length >= max(cfg.data.max_source_length, cfg.data.max_target_length)
    elif name not in ("clm", "sft") + SEQ2SEQ:
      assert cfg.model.name_or_path.endswith("model")
  if "model=" in arg:
    assert cfg.model.name_or_path == "bert-base-cased"
    if name == "sft" and "local" in arg:  # a checkpoint's own chat template
      assert cfg.data.chat_template is None
  if "steps=10" in arg:
    assert cfg.train.steps == 10


def test_unknown_family_is_named():
  from flaxhf.errors import ConfigError
  for name in ("clm", "sft"):
    with pytest.raises(ConfigError, match="family='lama' is not one of"):
      importlib.import_module(f"configs.{name}").get_config("local,family=lama")


def test_locked_config_rejects_typos():
  cfg = importlib.import_module("configs.text_classification").get_config("smoke")
  with pytest.raises(AttributeError, match="learning_rate"):
    cfg.train.learning_rat = 1e-3
  with pytest.raises(ValueError, match="valid"):
    importlib.import_module("configs.text_classification").get_config("smok")


def test_config_files_cover_documented_tasks():
  from flaxhf.train.tasks import TASKS
  documented = {CONFIG_TASKS.get(n, n) for n in ARGS}
  for name in TASKS:
    assert name in documented, f"configs/{name}.py has no documented arg strings under test"
