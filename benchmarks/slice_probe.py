"""Validation-only probe that chose the slice encoder's defaults (stage, pooling, views).

Frozen EfficientNet-Lite0 (pip ImageNet weights), each slice with its two neighbours as RGB at SIZE px,
along the axial view and along all three; pooled features (mean / max / both) of the final stage and of
the stages after ``blocks.2``…``blocks.5`` into a logistic regression (C in 0.001, 0.01, 0.1); prints the
best validation AUC of each. The test split is not read.

Usage: ``python benchmarks/slice_probe.py PATH/adrenalmnist3d.npz [THREADS] [SIZE]`` (about 6 min at 64 px
on 2 cores); features are saved to /tmp/vx/feats_SIZE.npz.
"""
from pathlib import Path
import sys, time, numpy as np, torch, torch.nn.functional as F
from medtransfer.backbones import get_weight_spec, load_backbone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv)>2 else 2)
npz = np.load(sys.argv[1]); size = int(sys.argv[3]) if len(sys.argv)>3 else 64
spec = get_weight_spec("efficientnet_lite0.in1k")
bb, rep = load_backbone(spec, 3, "pretrained", input_size=size); bb.eval()
inner = bb.model
taps = {}
for k in (2, 3, 4, 5):
    inner.blocks[k].register_forward_hook(lambda m, i, o, k=k: taps.__setitem__(k, o.mean((2, 3))))
mean = torch.tensor(spec.mean).view(1,3,1,1); std = torch.tensor(spec.std).view(1,3,1,1)
def views(v):  # v (D,H,W) float [0,1] -> list of (S,3,size,size) for axial/coronal/sagittal
    out=[]
    for perm in ((0,1,2),(1,0,2),(2,0,1)):
        a = torch.from_numpy(np.ascontiguousarray(v.transpose(perm)))
        a = F.pad(a[None,None], (0,0,0,0,1,1), mode="replicate")[0,0]
        g = torch.stack([a[:-2], a[1:-1], a[2:]], 1)  # (S,3,H,W)
        g = F.interpolate(g, size=(size,size), mode="bilinear", align_corners=False)
        out.append((g-mean)/std)
    return out
def feats(split):
    X = npz[f"{split}_images"].astype(np.float32)/255.
    res = {k: [] for k in ("final", 2, 3, 4, 5)}
    t=time.time()
    with torch.inference_mode():
        for v in X:
            vs = views(v); n=[len(x) for x in vs]
            f = bb(torch.cat(vs))
            res["final"].append(torch.stack([c for c in f.split(n)]).numpy() if len(set(n))==1 else None)
            for k in (2,3,4,5): res[k].append(torch.stack(list(taps[k].split(n))).numpy())
    print(split, len(X), time.time()-t, flush=True)
    return {k: np.stack(v) for k, v in res.items()}, npz[f"{split}_labels"].ravel()
tr, ytr = feats("train"); va, yva = feats("val")
Path("/tmp/vx").mkdir(exist_ok=True); np.savez(f"/tmp/vx/feats_{size}.npz", **{f"tr_{k}": v for k,v in tr.items()}, **{f"va_{k}": v for k,v in va.items()}, ytr=ytr, yva=yva)
for k in tr:
    for views_used in ((0,), (0,1,2)):
        for pool in ("mean","max","meanmax"):
            def P(a):
                a = a[:, list(views_used)]
                if pool=="mean": r=a.mean(2)
                elif pool=="max": r=a.max(2)
                else: r=np.concatenate([a.mean(2), a.max(2)], -1)
                return r.reshape(len(a), -1)
            sc = StandardScaler().fit(P(tr)[...] if False else P(tr[k]))
            best = 0
            for C in (0.001, 0.01, 0.1):
                lr = LogisticRegression(C=C, max_iter=3000).fit(sc.transform(P(tr[k])), ytr)
                auc = roc_auc_score(yva, lr.predict_proba(sc.transform(P(va[k])))[:,1])
                best = max(best, auc); 
            print(k, views_used, pool, f"best val AUC {best:.3f}", flush=True)
