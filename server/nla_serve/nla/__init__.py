"""NLA checkpoints, the verbalizer (AV), the reconstructor (AR), and the runtime that joins them."""

from nla_serve.nla.checkpoint import ARCheckpoint, AVCheckpoint, NLACheckpoint, load_ar, load_av, load_nla

__all__ = ["ARCheckpoint", "AVCheckpoint", "NLACheckpoint", "load_ar", "load_av", "load_nla"]
