"""A memory analysed by the model before it is kept (AIOS's `add_agentic_memory`): its keywords, a one-line
context and broad tags, as JSON constrained to a schema, stored as the memory's metadata. `generate` is handed
in by the transport, so that the generation passes its edge."""
from __future__ import annotations

import json

from .generation import Generation

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["keywords", "context", "tags"],
          "properties": {"keywords": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
                         "context": {"type": "string"},
                         "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8}}}
PROMPT = ("Reply with a JSON object: the content's keywords (nouns, verbs, key concepts), a one-sentence context, "
          "and broad tags.")


class MemoryAnalysis:
    def __init__(self, generate, models):
        self.generate = generate
        self.models = models

    async def analyze(self, principal, content: str) -> dict[str, str]:
        g = Generation(messages=[{"role": "system", "content": PROMPT}, {"role": "user", "content": content}],
                       model=self.models.default, max_tokens=160, temperature=0.0, response_format="json_schema",
                       schema_json=json.dumps(SCHEMA), strict=True)
        reply = await self.generate(principal, g)
        try:
            data = json.loads(reply.text)
        except ValueError:                           # cut short by max_tokens: keep what the content says
            return {"context": content[:200]}
        return {"keywords": ", ".join(map(str, data.get("keywords", [])))[:1000],
                "context": str(data.get("context", ""))[:1000],
                "tags": ", ".join(map(str, data.get("tags", [])))[:1000]}
