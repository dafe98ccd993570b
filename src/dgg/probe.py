# TEMPORARY development stub (untracked); replaced by the probe branch.
class LMHeadGradProbe:
    def __init__(self, model, tied="output"):
        self.head = model.get_output_embeddings()
    def energy(self):
        g = self.head.weight.grad
        if g is None:
            raise RuntimeError("no grad")
        return g.float().pow(2).sum()
    def reset(self):
        pass
    def close(self):
        pass
