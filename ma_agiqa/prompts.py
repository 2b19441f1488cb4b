"""The reference's two MLLM questions: the semantic branch's default prompts, and text the tiny models'
tokenizers are trained on (a leaf module, so that ``config`` and ``tiny`` share them without importing each
other)."""

COHERENCE_PROMPT = "Evaluate if the image quality is compromised due to violations of coherence."
SEMANTIC_PROMPT = (
    "Evaluate the input image to determine if its quality is compromised due to a lack of meaningful "
    "semantic content."
)
