"""HATA's held-out mass at the budgets whose bytes equal two-stage HATA's at 1/16.

    python bench/results/recall_rerank/equal_bytes.py SAMPLES_DIR OUT.json

At budget fraction f, HATA reads the codes and norms (20 B per token per KV head at rbit 128)
plus K and V of the budget; two-stage HATA with factor c reads the codes, K of the c x budget
candidates and V of the budget (its K are among the candidates). Equal bytes: HATA's budget
(c + 1) / 2 x f, whatever the head size; c = 2 and 4 at f = 1/16 give 3/32 and 5/32.
"""
import json
import sys

from hata_jax.models.load import load_model
from hata_jax.train import checkpoint, recall
from hata_jax.train.hata_objective import HataObjective
from hata_jax.train.projections import shipped_weights

samples, out = sys.argv[1], sys.argv[2]
model, _ = load_model("smollm2")
trained, metadata = checkpoint.load_trained(shipped_weights("smollm2"), model, "hata")
methods = {recall.TRAINED: (HataObjective(rbit=metadata["rbit"]), trained)}
result = recall.evaluate(samples, metadata["layers"], methods, fractions=(3 / 32, 5 / 32))
with open(out, "w") as f:
    json.dump({"samples": samples, "fractions": result["fractions"],
               "mean": {name: data["mean"] for name, data in result["methods"].items()}}, f, indent=1)
print(json.dumps(result["fractions"]), {name: data["mean"] for name, data in result["methods"].items()})
