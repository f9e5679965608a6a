"""Evaluation of long-context behaviour: passkey retrieval, loss past the training length, state norms.

All three read prompts of any length with the recurrent state (chunked prefill), so memory
does not grow with the context length.
"""
