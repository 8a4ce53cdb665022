"""``longtrain-eval``: evaluate a checkpoint or a Hugging Face directory on the needle-in-a-haystack
passkey grid and on a local file's perplexity (:mod:`longtrain.eval.cli`)."""
