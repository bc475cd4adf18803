"""The fleet simulator (`bin/simulate`): simulated device agents that onboard, register their devices
and execute operations through the platform's public API only (HTTP and CometD), as any outside
client would. It imports nothing from the platform's own packages."""
