"""The config schema (each key once: default, accepted values, whether it changes the trained
model), the presets, and the typed frozen settings the programs pass down."""
