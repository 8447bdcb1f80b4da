"""Every explanation the app shows, in one place, written for a workshop audience."""

# The app's log line once its model is loaded (`bench start` waits for it).
READY_LOG = "the app is ready"

TITLE = "LoRSU: teach a vision-language model something new, without making it forget"

INTRO = (
    "A vision-language model (VLM) answers questions about images. Here you show it **a few "
    "labelled images of something it gets wrong**, train for a few seconds, and watch two "
    "numbers: did it get better at the new thing (**TI**), and did it stay as good at what it "
    "knew (**CC**)? **LoRSU** updates only a small, carefully chosen part of the image encoder, "
    "so it learns without forgetting. Steps: **1** pick or upload images, **2** press Train, "
    "**3** chat with the result, **4** roll back if you like."
)

PICK = (
    "Each example shows classes the model knows in a *style its image encoder never saw*. "
    "Training images teach; test images (kept aside) measure."
)

UPLOAD_CARDS = (
    "One card per class: type the class name and drop a few images (PNG, JPEG, WebP, GIF, TIFF or BMP). "
    "Two classes at least, two images per class at least; about a third of each class is kept "
    "aside as test images."
)


def upload_zip(labels: list[str]) -> str:
    a, b = example_names(labels)
    return (
        f"A zip of folders named after the classes (`{a}/1.png`, `{b}/1.png`, ...), optionally "
        "under `train/` and `test/`."
    )


def upload_files(labels: list[str]) -> str:
    a, b = example_names(labels)
    return f"Or images named `class_anything.png` (for example `{a}_01.png`, `{b}_07.jpg`)."


def example_names(labels: list[str]) -> tuple[str, str]:
    """Two class names for the upload hints: ones the model knows, where it has a fixed list."""
    names = labels[::-1] or ["cat", "dog"]
    return names[0], names[1 % len(names)]


def known_names(labels: list[str]) -> str:
    """What a model with a fixed list of class names (the offline toy) accepts, said before an
    upload rather than after it is refused."""
    digits = " Write digits as words (`eight`, not `8`)." if "eight" in labels else ""
    return (
        f"**This model knows only these class names:** {', '.join(labels)}. Teach them in a new "
        f"style: your handwriting, a photo of a display, a drawing.{digits} Any other name needs "
        "a model whose tokenizer takes any label (LLaVA-1.5 on a GPU)."
    )


READER = (
    "CLIP compares each test image with a caption per class (fast). The chat model answers "
    "a 5-way multiple-choice question, or an open one, about each image (slower, what a user "
    "of the VLM sees). Your history keeps the reader of its first session."
)

SETTINGS = (
    "**Shots** = training images per class (few-shot learning: 5 is the paper's CL-5). "
    "**Epochs** = passes over them (DAC counts steps instead, as its authors: see Iterations)."
)

METHODS_HELP = {
    "lorsu": "LoRSU (the paper's method): finds the attention heads that matter most for your "
    "images, trains only those (plus 10% of each MLP), leaves the rest untouched.",
    "lorsu-rand": "Ablation: LoRSU but with heads picked at random (do the scores matter?).",
    "lorsu-aah": "Ablation: LoRSU on all attention heads (more change, more forgetting?).",
    "lorsu-ppl": "LoRSU trained through the language model's answer (slower, needs the VLM).",
    "lora": "Baseline: a low-rank update on every layer of the image encoder.",
    "spu": "Baseline: SPU, which trains 10% of each MLP layer and no attention.",
    "full": "Baseline: every weight of the image encoder trains. Learns fast, forgets most.",
    "keeplora": "KeepLoRA: a low-rank update kept away from the directions that past sessions "
    "and the pretrained weights rely on most (its authors' strength: scale 1/16, lr 1e-3). When "
    "it finishes it says how many input directions each layer still leaves free to learn.",
    "keeplora++": "KeepLoRA++: KeepLoRA with smaller updates in the first (shallow) layers "
    "(the layer scaling formula is our assumption: the paper's is not public).",
    "dac": "DAC: a pool of tiny (rank-1) experts; each image picks a few, and each session "
    "keeps the ones it used most. It trains as its authors do: 500 steps of 32 images at lr "
    "2e-3 (AdamW, no weight decay), so the Epochs slider does not apply; set Iterations under "
    "Advanced settings (0 = train by epochs instead).",
}

KNOBS = {
    "lr": ("Learning rate", "Step size of each update. Too high: forgetting; too low: no change."),
    "batch_size": ("Batch size", "Images per training step."),
    "iterations": (
        "Iterations",
        "Training steps; 0 = use Epochs. DAC trains 500 steps, as its authors.",
    ),
    "heads": ("Heads per layer (k)", "How many attention heads LoRSU trains in every layer."),
    "rank": ("LoRA rank", "Size of the low-rank update on each selected head."),
    "alpha": ("LoRA alpha", "Scale of the low-rank update (alpha / rank)."),
    "sparsity": ("MLP share", "Fraction of each layer's fc1 weights that train (0.1 = 10%)."),
    "weight_decay": ("Weight decay", "Pulls trained weights back a little every step."),
    "warmup": ("Warm-up", "Fraction of the steps with a rising learning rate."),
    "multi_positive": (
        "Same-class pairs are positives",
        "Off = the paper's loss; on = images of one class in a batch count as matches.",
    ),
    "principal_energy": (
        "Kept energy (weights)",
        "KeepLoRA leaves alone the weight directions holding this share of their energy.",
    ),
    "feature_energy": (
        "Kept energy (features)",
        "KeepLoRA leaves alone past sessions' feature directions holding this share.",
    ),
    "dropout": ("Dropout", "Share of the adapter's inputs dropped at random while training."),
    "question": ("Training question", "The question the answer loss is trained on."),
    "max_importance_images": (
        "Images for scoring",
        "At most this many images are used to score the heads.",
    ),
}

LIVE = (
    "**While it trains:** the loss should fall; the blue line (new data) should rise; the "
    "orange line (what it knew) should stay flat."
)

HEATMAP = (
    "**What LoRSU changes.** Before training, one pass over your images measures how much each "
    "attention head would help (darker = more). LoRSU trains only the **red-boxed** heads in "
    "every layer, plus the share of MLP weights on the right. Grey rows are encoder layers the "
    "language model never reads (LLaVA reads the second-to-last layer), so changing them "
    "cannot change an answer."
)

PROBES = (
    "**Probe images:** when you press Train, five test images are picked that the model gets "
    "wrong before the session (one per class where it can; ones it gets right fill in when "
    "there are too few), then shown to the untouched base model, the model before this session "
    "and after it. They are picked to make the change visible: TI above is the fair measure."
)

CHAT = (
    "Ask the model about any image. **Version** picks which point of your history answers "
    "(0 = the untouched base model); the base model's answer is shown beside it for comparison. "
    "Only your own sessions are used: other visitors' training never reaches your chat."
)

SESSIONS = (
    "Every Train press adds a **session**: a small, exact change on top of the shared model. "
    "The **accuracy matrix** shows every test set after every session: a row that gets greener "
    "learned something; a column that turns red later was forgotten. **Roll back** removes the "
    "later sessions exactly (the weights return bit for bit). Your history lives only in this "
    "browser tab: **download it** to keep it, upload it later to continue."
)

MATRIX_FIGURES = (
    "As MTIL computes them (ZSCL, KeepLoRA), on the rows after each session (not the base row): "
    "**Avg**: mean accuracy over the trained sets; **Last**: their mean after the last session; "
    "**Transfer**: a trained set's accuracy in the sessions before it was trained (from the "
    "second trained set on); **BWT** (backward transfer): how trained sets changed after later "
    "sessions (below zero = forgetting). The **Worst other set** column names the set, other "
    "than the target and the control, that lost most since the base model: the paper's "
    "control is every other dataset, CC here only the control set."
)

HOW = """
### The problem
A vision-language model such as LLaVA looks at an image with its **image encoder** (a CLIP
vision transformer), turns it into tokens, and a language model writes the answer. When the
images look different from what the encoder saw in training (handwriting instead of print,
a medical scan, a new traffic sign), the answers go wrong. Fine-tuning the whole encoder on a
few examples fixes them but damages everything else: **catastrophic forgetting**.

### What LoRSU does (Low-Rank adaptation with Structured Updates)
1. **Score.** One pass over your few images measures, for every attention head in every layer,
   how much its weights would need to change (the size of the gradient).
2. **Select.** In every layer, keep the top *k* heads (2 by default) and the top 10% of the MLP's
   first weights (fc1). Everything else stays frozen.
3. **Train.** A small low-rank update (LoRA) on just those heads' rows, plus the chosen fc1
   weights, with the CLIP contrastive loss: images must match captions "a photo of a {class}".
4. **Merge.** The update is folded into the encoder. The language model is never touched.

The result: the encoder learns the new look, while the rest of what it knew stays in place.
The paper reports large TI with near-zero CC, where full fine-tuning loses much more.

### The two numbers
- **TI (Target Improvement)** = accuracy on new, held-out images of your data now, minus the
  base model's. Higher is better.
- **CC (Control Change)** = accuracy on a *control set* of things the model already knew, now
  minus before. Zero is ideal; below zero is forgetting.

Accuracies are measured the cheap way: the image encoder's CLIP match between the image and
"a photo of a {class}" for every class (the class with the best match is the prediction).

### Sessions
Each training run is a *session*; sessions stack. The app stores each one as the exact values
it changed, so any session can be removed again exactly (**Roll back**). Many people can use one
app at once: the model is shared, everyone's sessions are applied only while their own request
runs, and all model work waits in one queue.

### Methods to compare
`lorsu` (default), `lorsu-rand` and `lorsu-aah` (ablations: random heads, all heads), `lora`,
`spu` and `full` (baselines). Try `full` on the same data and watch CC.

Paper: *Efficient Few-Shot Continual Learning in Vision-Language Models* (arXiv 2502.04098).
"""
