"""Text classification over token ids: noisy topic labels, found and explained.

Documents arrive as int64 token ids (a tokenizer's output), shape (n_documents,
length). A module with an ``nn.Embedding`` or ``nn.EmbeddingBag`` receives them
as integers, and each embedding's per-sample gradient is taken from the
sample's own tokens, with no dense table per sample. The data are synthetic
topic documents (hydraclean.datasets.make_topic_tokens: nothing downloads),
four topics, 20% of the labels flipped; the model a two-layer transformer.

    python examples/text_token_ids.py [--small] [--bag]
"""

import argparse
import time
import warnings

import numpy as np
from sklearn.metrics import roc_auc_score

from hydraclean import HydraLabelCleaner
from hydraclean.datasets import make_label_noise, make_topic_tokens
from hydraclean.models import BagOfTokens, TokenTransformer

TOPICS = ("sports", "science", "politics", "arts")


def main(small: bool, bag: bool) -> None:
    n_train, n_val, length, vocab = (1000, 200, 24, 500) if small else (4000, 500, 32, 1000)
    X, y = make_topic_tokens(n_train + n_val, n_classes=4, vocab_size=vocab, length=length, random_state=0)
    X_train, y_train, X_val, y_val = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
    y_noisy, noise = make_label_noise(y_train, 0.2, random_state=0)
    print(f"{n_train} documents of {length} token ids ({X.dtype}), vocabulary {vocab}; "
          f"{int(noise.sum())} labels flipped")

    model = BagOfTokens(vocab, 4) if bag else TokenTransformer(vocab, 4, max_length=length)
    t0 = time.perf_counter()
    cleaner = HydraLabelCleaner(model, max_epochs=6 if small else 5, batch_size=64, lr=0.5 if bag else 0.1,
                                random_state=0).fit(X_train, y_noisy, X_val=X_val, y_val=y_val)
    print(f"{type(model).__name__}: fit in {time.perf_counter() - t0:.1f} s, validation accuracy "
          f"{cleaner.history_['valid_accuracy'][-1]:.3f}")
    print(f"AUROC against the flipped labels: the default score (label_quality_) "
          f"{roc_auc_score(noise, -cleaner.label_quality_):.3f}, the paper's C(i) (contribution_) "
          f"{roc_auc_score(noise, -cleaner.contribution_):.3f}")
    flagged = np.flatnonzero(cleaner.label_issues_)
    print(f"flagged {len(flagged)} documents, {noise[flagged].mean():.0%} of them truly flipped")
    for i in flagged[np.argsort(cleaner.contribution_[flagged])][:3]:
        print(f"  document {i}: labelled {TOPICS[y_noisy[i]]!r}, the validation loss says "
              f"{TOPICS[cleaner.suggested_label_[i]]!r} (true topic {TOPICS[y_train[i]]!r})")

    # which training documents moved the model on one validation document, and which way
    explanation = cleaner.explain(X_val[:1], y_val[:1], k=3)
    print(f"validation document 0 ({TOPICS[y_val[0]]!r}): most helpful training documents "
          f"{explanation.helpful[0].tolist()} (labels {[TOPICS[y_noisy[j]] for j in explanation.helpful[0]]}), "
          f"most harmful {explanation.harmful[0].tolist()} (labels {[TOPICS[y_noisy[j]] for j in explanation.harmful[0]]})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run (CI)")
    parser.add_argument("--bag", action="store_true", help="an EmbeddingBag classifier instead of the transformer")
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main(args.small, args.bag)
