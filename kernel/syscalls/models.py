"""The models syscall: which models this kernel serves, and which of them and their adapters an agent may use
(`llm.list_models` over gRPC lists them all; OpenAI's `/v1/models` and AIOS's model list what the caller may
use or what is served)."""
from __future__ import annotations

from dataclasses import dataclass

from ..llm.core import LLMCore, ServedModel


@dataclass
class UsableModel:
    name: str
    adapters: list[str]      # the adapters the caller may use (published ones are "OWNER:NAME")


class Models:
    def __init__(self, llm: LLMCore, access):
        self.llm = llm
        self.access = access

    @property
    def default(self) -> str:
        return self.llm.default

    def names(self) -> set[str]:
        return set(self.llm.models)

    def served(self) -> list[ServedModel]:
        return list(self.llm.models.values())

    def usable(self, principal) -> list[UsableModel]:
        """Each served model the caller may use, with each of its adapters it may use."""
        allowed = self.access.decide_named
        return [UsableModel(m.name, [a for a in m.adapters if allowed(principal, "model", f"{m.name}/{a}")[0]])
                for m in self.served() if allowed(principal, "model", m.name)[0]]
