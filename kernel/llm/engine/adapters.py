"""LoRA adapters in the served model: which one each row of a batch uses, and loading (or replacing) one
while the engine runs. peft routes adapters per row (`adapter_names`), except adapters on fused MoE
experts (`target_parameters`): once such an adapter is loaded, a batch holds rows of one adapter and the
model's active adapter is switched between batches."""
from __future__ import annotations

from pathlib import Path

from ..registry import LoadedModel, peft_name
from ..types import AdapterInUse


def _adapts_parameters(peft_config) -> bool:
    return bool(getattr(peft_config, "target_parameters", None))


class Adapters:
    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.active = lm.adapters[0] if lm.adapters else None      # peft's active adapter
        self.unbatchable = {a for a in lm.adapters if _adapts_parameters(lm.model.peft_config[peft_name(a)])}

    def batchable(self, rows, seq) -> bool:
        """May `seq` join a batch of `rows`? Only rows of its own adapter when an expert adapter is involved."""
        if not self.unbatchable or not rows:
            return True
        adapters = {s.req.adapter for s in rows} | {seq.req.adapter}
        return len(adapters) == 1 or not (adapters & self.unbatchable)

    def call(self, kwargs: dict, adapters: list[str | None]):
        """Run the model on `kwargs` with each row's adapter (None: the base model)."""
        model = self.lm.model
        if not self.lm.has_adapters:
            return model(**kwargs)
        if not self.unbatchable:
            return model(adapter_names=[peft_name(a) if a else "__base__" for a in adapters], **kwargs)
        (adapter,) = set(adapters)          # `batchable` keeps such batches to one adapter
        if adapter is None:
            with model.disable_adapter():
                return model(**kwargs)
        if self.active != adapter:
            model.set_adapter(peft_name(adapter))   # walks every module: only on a change
            self.active = adapter
        return model(**kwargs)

    def load(self, name: str, folder: Path, in_use: dict[str, set]) -> list[str]:
        """Load or replace adapter `name` (on the engine thread, between steps). `in_use`: the adapters of
        running requests ("running") and of all live ones ("all"). The first adapter wraps the model in peft."""
        from peft import PeftConfig, PeftModel

        internal = peft_name(name)
        expert = _adapts_parameters(PeftConfig.from_pretrained(folder))
        if expert and len(in_use.get("running", set())) > 1:
            raise AdapterInUse(f"adapter '{name}' cannot join the running mixed-adapter batch; try again")
        if not self.lm.has_adapters:
            self.lm.model = PeftModel.from_pretrained(self.lm.model, folder, adapter_name=internal, is_trainable=False)
            self.active = name
        else:
            if name in self.lm.adapters:
                if name in in_use.get("all", set()):
                    raise AdapterInUse(f"adapter '{name}' is in use by running requests; try again")
                self.lm.model.delete_adapter(internal)
                if self.active == name:
                    self.active = None
            self.lm.model.load_adapter(folder, adapter_name=internal, is_trainable=False)
        self.lm.model.eval()
        if name not in self.lm.adapters:
            self.lm.adapters.append(name)
        if expert:
            self.unbatchable.add(name)
        else:
            self.unbatchable.discard(name)
        return list(self.lm.adapters)
