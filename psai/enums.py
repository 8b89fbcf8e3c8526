"""PolicySynth's enumerations, as str enums so they compare equal to the stored strings."""
from enum import Enum

__all__ = [
    "PsAiModelType", "PsAiModelSize", "PsAiModelProvider",
    "InferenceType", "RegionalProcessing", "ReasoningMode",
]


class PsAiModelType(str, Enum):
    Embedding = "embedding"
    Text = "text"
    MultiModal = "multiModal"
    Audio = "audio"
    Video = "video"
    Image = "image"
    TextReasoning = "reasoning"
    MultiModalReasoning = "multiModalReasoning"


class PsAiModelSize(str, Enum):
    Large = "large"
    Medium = "medium"
    Small = "small"


class PsAiModelProvider(str, Enum):
    OpenAI = "openai"
    OpenAIResponses = "openaiResponses"
    Anthropic = "anthropic"
    Google = "google"
    Azure = "azure"


class InferenceType(str, Enum):
    Flex = "flex"
    Priority = "priority"
    Fast = "fast"


class RegionalProcessing(str, Enum):
    EU = "eu"


class ReasoningMode(str, Enum):
    Standard = "standard"
    Pro = "pro"
