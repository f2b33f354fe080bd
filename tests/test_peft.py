"""Fine-tuning a fastq-loaded model with PEFT LoRA adapters, as QLoRA users do: the same training as on
the model transformers + bitsandbytes loads (same losses, step for step), the adapter saved and loaded
back onto a fresh fastq model giving the trained outputs."""

import fastq
import pytest
import torch

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*gradient_checkpointing.*:FutureWarning", "ignore:.*is_gradient_checkpointing.*:FutureWarning"
)

CONFIGS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
    "int8": {"load_in_8bit": True},
}


def _lora(model):
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          task_type="CAUSAL_LM")
    return peft.get_peft_model(model, cfg)


def _train(model, steps=4):
    torch.manual_seed(0)
    for n, p in model.named_parameters():  # the same adapter initialisation on both models
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.arange(2 * 32).reshape(2, 32) * 7 % 1000
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_lora_trains_like_transformers(tiny_model, kind, tmp_path):
    import transformers

    path = tiny_model("llama", torch.float32)
    bnb = transformers.BitsAndBytesConfig(**CONFIGS[kind])
    torch.manual_seed(0)
    ours = _lora(fastq.load(path, bnb, "cpu", dtype=torch.float32, progress=False))
    torch.manual_seed(0)
    theirs = _lora(transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb, device_map="cpu", dtype=torch.float32))
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    a, b = _train(ours), _train(theirs)
    assert a == b, (a, b)
    assert a[-1] < a[0]  # it learns

    ours.save_pretrained(tmp_path / "adapter")
    ours.eval()
    x = torch.arange(16).unsqueeze(0) * 11 % 1000
    with torch.no_grad():
        want = ours(input_ids=x).logits
    fresh = fastq.load(path, bnb, "cpu", dtype=torch.float32, progress=False)
    back = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = back(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
