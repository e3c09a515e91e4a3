"""Model specs (TOML) the integration tests share: small models whose answers the tests compute
independently in closed form."""

#: one compartment, IV bolus, CL 3 L/h and V 30 L with IIV 0.09 / 0.05, combined error 0.1 mg/L + 10%
IV_1CMT = """name = "q_iv"
structure = "1cmt_iv"
citation = "test"
route = "bolus"

[typical]
CL = 3.0
V = 30.0

[iiv]
CL = 0.09
V = 0.05

[error]
kind = "combined"
add = 0.1
prop = 0.1
"""
