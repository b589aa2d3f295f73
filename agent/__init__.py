"""The Frida agent (JavaScript + CModule C), shipped as package data."""
