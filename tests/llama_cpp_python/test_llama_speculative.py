# From llama-cpp-python, https://github.com/abetlen/llama-cpp-python, tests/test_llama_speculative.py at commit
# 3691546f1c9e0c1bf93323dff02230bd959cf562 (tag v0.3.35, the newest release in the snapshot; the installed
# llama-cpp-python is 0.3.36). MIT License, Copyright (c) 2023 Andrei Betlen.
#
# Run against ggml_backend. Changed: the import, marked "ggml_backend:".
import numpy as np

# ggml_backend: was `from llama_cpp.llama_speculative import LlamaPromptLookupDecoding`
import llama_cpp_shim as llama_cpp

LlamaPromptLookupDecoding = llama_cpp.llama_speculative.LlamaPromptLookupDecoding


def test_find_candidate_pred_tokens():
    find_candidate_pred_tokens = LlamaPromptLookupDecoding.find_candidate_pred_tokens

    # Test Case 1: Matching ngram is found
    input_ids1 = np.array([1, 2, 3, 1, 2, 3, 1, 2, 3])
    result1 = find_candidate_pred_tokens(
        input_ids1, max_ngram_size=3, num_pred_tokens=2
    )
    assert np.array_equal(result1, np.array([1, 2]))

    # Test Case 2: Matching ngram is not found
    input_ids2 = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9])
    result2 = find_candidate_pred_tokens(
        input_ids2, max_ngram_size=3, num_pred_tokens=2
    )
    assert np.array_equal(result2, np.array([]))
