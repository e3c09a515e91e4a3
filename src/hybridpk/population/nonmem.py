"""Import a NONMEM control stream through pharmpy-core, and write the final estimates back
(:func:`write_control_stream`). Structures: ADVAN1-4, 11, 12 with the TRANS NONMEM allows; $DES with ADVAN6, 8,
13 or 14 and the general linear ADVAN5/7 (:mod:`.des`), with model event times (MTIME, MPAST) in those; $PRED
(the prediction written at every record).

The $PK statements are evaluated as they are (THETA/ETA/data-item arithmetic and IF blocks) at every record
with that record's data items, as NONMEM does (a record's values hold over the interval it ends; see
:meth:`PopulationModel.parameters`), compiled once (:mod:`._sympy_torch`); the ADVAN and TRANS select the
structural model and how its parameters are read (NONMEM help: ADVANn, TRANSn; the scale S1/S2 defaults to 1).
$OMEGA blocks, SAME (inter-occasion variability) and FIX are kept. The $ERROR model is read symbolically from Y
(on F, IPRED or the observed amount): Y at EPS = 0 must be the prediction, and the residual variance is
NONMEM's sum_k SIGMA(k) (dY/dEPS(k))^2 at EPS = 0: additive, proportional or combined where those derivatives
are 1 or the prediction, else the general form, whose derivatives may read THETAs, ETAs and data items (THETA
SDs with $SIGMA 1 FIX, ETA on EPS). $ESTIMATION selects FOCE-I, FOCE, FO or Laplace, MAXEVAL=0 evaluation, and
$COVARIANCE the standard errors. Whatever would be carried out otherwise than written is refused with the
construct and its line. Parameter names are pharmpy's (e.g. POP_CL, IIV_CL, SIGMA); individual parameters are
reported under the stream's names for its ADVAN (ADVAN4's V2 is the central volume). Lower case is read as
NM-TRAN reads it (:func:`nmtran_case`). Requires ``hybridpk[nonmem]``.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import HybridPKError, ModelError
from ..io import atomic_write_text
from ..models import get_model
from ._sympy_torch import compile_expression, compile_statements
from .des import TIME_SYMBOL, LinearStatementModel, PredModel, StatementModel, is_linear
from .nonmem_m3 import RESERVED as M3_RESERVED
from .nonmem_m3 import read_censoring
from .omega import band_zeros_problem
from .spec import ErrorModel, PopulationModel, Theta

# records named in messages (regular expressions for _where)
_EST, _OMEGA, _BLOCK, _SIGMA = r"\$EST", r"\$OMEGA", r"\$OMEGA\s+BLOCK", r"\$SIGMA"
_OMEGA_OR_SIGMA = r"\$(OMEGA|SIGMA)"
_ADVAN = {1: "1cmt_iv", 2: "1cmt_oral", 3: "2cmt_iv", 4: "2cmt_oral", 11: "3cmt_iv", 12: "3cmt_oral"}
#: ADVANs whose equations the control stream writes: $DES (general nonlinear) and K<i><j> (general linear)
_DES_ADVANS, _LINEAR_ADVANS = (6, 8, 13, 14), (5, 7)
_SUPPORTED = "ADVAN1-4, 11, 12, the general linear ADVAN5/7 and $DES with ADVAN6, 8, 13 or 14"


def _pharmpy():
    """pharmpy's NONMEM parser: parse(code, path) -> Model, reading $DATA relative to ``path``."""
    try:
        from pharmpy.model.external.nonmem import parse_model
    except ImportError:
        raise HybridPKError("reading NONMEM control streams needs pharmpy-core: pip install 'hybridpk[nonmem]'") \
            from None
    return parse_model


#: a quoted string (kept as written; an unclosed one runs to the end of the code) or a file-name option
_PROTECTED = re.compile(r"""('[^']*'?|"[^"]*"?)|\b((?:FILE|MSFO|MSFI)\s*=\s*)(\S+)""", re.I)
#: records whose first word is a file name
_FILE_RECORDS = ("DAT", "MSF", "INC")


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a control-stream line: the comment starts at the first ';' outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == ";":
            return line[:i], line[i:]
    return line, ""


def _upper_code(code: str) -> str:
    """``code`` in upper case but for quoted strings and the file names of FILE=, MSFO= and MSFI=."""
    out, pos = [], 0
    for m in _PROTECTED.finditer(code):
        out.append(code[pos:m.start()].upper())
        out.append(m.group(1) if m.group(1) else m.group(2).upper() + m.group(3))
        pos = m.end()
    return "".join(out) + code[pos:].upper()


def nmtran_case(text: str) -> str:
    """A control stream as NM-TRAN reads it: NONMEM 7.2 and later accept lower case in records, options and
    abbreviated code and read it as upper case (so ``$data run.csv ignore=@`` and ``cl=theta(1)*exp(eta(1))``
    are ``$DATA run.csv IGNORE=@`` and ``CL=THETA(1)*EXP(ETA(1))``; NONMEM 7.5 runs such streams). Kept as written:
    comments (THETA labels), quoted strings, the $PROBLEM title and file names (the first word of $DATA, $MSFI
    and $INCLUDE; FILE=, MSFO=). No line moves, so the line numbers in messages are the user's."""
    lines, record, file_due = [], "", False
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        code, comment = _split_comment(body)
        head = re.match(r"(\s*\$)(\w+)", code)
        rest_at = 0
        if head:
            record = head.group(2).upper()
            file_due = record.startswith(_FILE_RECORDS)
            rest_at = head.end()
        if record.startswith("PROB"):
            code = code[:rest_at].upper() + code[rest_at:]
        elif file_due and code[rest_at:].strip():
            word = re.match(r"\s*\S+", code[rest_at:])
            cut = rest_at + word.end()
            code = code[:rest_at].upper() + code[rest_at:cut] + _upper_code(code[cut:])
            file_due = False
        else:
            code = _upper_code(code)
        if record.startswith(("THE", "OME", "SIG")):     # (value)xn repeats a value n times; pharmpy reads 'x'
            code = re.sub(r"\)(\s*)X(\s*\d)", r")\1x\2", code)
        lines.append(code + comment + line[len(body):])
    return "".join(lines)


def _stream_text(path: Path) -> str:
    """The control stream at ``path`` in NM-TRAN's case (UTF-8, else Latin-1 as pharmpy reads it)."""
    raw = path.read_bytes()
    try:
        return nmtran_case(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return nmtran_case(raw.decode("latin-1"))


#: marks the $TABLE and $SCATTER lines set aside from pharmpy (see :func:`_parse_stream`)
_SET_ASIDE = ";hybridpk-set-aside;"


def _set_aside_tables(text: str) -> str:
    """``text`` with its $TABLE and $SCATTER records made comments (marked, line for line): hybridpk writes its
    own tables, and pharmpy's option parser misreads valid ones (NONMEM's NPD item as an abbreviation of NPDTYPE:
    ``$TABLE ... NPD NPDE`` was refused with "invalid literal for int(): 'NPDE'")."""
    out, aside = [], False
    for line in text.splitlines(keepends=True):
        head = re.match(r"\s*\$(\w+)", line)
        if head:
            aside = head.group(1).upper().startswith(("TAB", "SCAT"))
        out.append(_SET_ASIDE + line if aside else line)
    return "".join(out)


def _parse_stream(text: str, path: Path):
    """pharmpy's model of the control stream ``text`` read from ``path`` ($DATA is relative to it), its $TABLE
    records set aside (:func:`_set_aside_tables`; :func:`write_control_stream` puts them back)."""
    parse = _pharmpy()
    try:
        return parse(_set_aside_tables(text), path)
    except Exception as exc:  # pharmpy's parser errors are not ours to enumerate
        raise HybridPKError(f"pharmpy could not read {_where_parse_failed(text, path, str(exc))}: {exc}"
                            + _nm74_hint(text) + _option_hint(text)) from None


def _where_parse_failed(text: str, path, message: str) -> str:
    """'FILE line N' of the line that pharmpy's parser error ``message`` points at, else the file's name. Its line
    and column count within one record ("at line 1 col 13"): the line is found by the text the message quotes,
    or by the unexpected token at that line and column of exactly one record ("Unexpected token Token('NUMERIC',
    '0.176') at line 1, column 5": on the record's first line the column counts from after its name)."""
    lines = text.splitlines()
    quoted = [ln.strip() for ln in message.splitlines()[1:3] if ln.strip() and not ln.strip().startswith("^")]
    if quoted and len(quoted[0]) >= 6:     # shorter (a bare number) could be found on another line
        for i, line in enumerate(lines, 1):
            if quoted[0] in line.split(";", 1)[0]:
                return f"{Path(path).name} line {i}"
    token = re.search(r"Token\('\w+', '([^']*)'\) at line (\d+), column (\d+)", message)
    if token and token.group(1):
        value, row, col = token.group(1), int(token.group(2)) - 1, int(token.group(3)) - 1
        heads = {i: m.end() for i, line in enumerate(lines) if (m := re.match(r"\s*\$\w+", line))}
        # on a record's first line the column counts from after the record's name
        hits = [h + row for h, after_name in heads.items() if h + row < len(lines)
                and lines[h + row][col + (after_name if row == 0 else 0):].startswith(value)]
        if len(hits) == 1:
            return f"{Path(path).name} line {hits[0] + 1}"
    return str(path)


#: an option written before a single value of a $OMEGA or $SIGMA record outside parentheses ($OMEGA SD 0.176)
_OPTION_BEFORE_VALUE = re.compile(r"^\s*\$\w+\s+(DIAGONAL\s*\(\s*\d+\s*\)\s+)?(SD|STANDARD|VARIANCE|CORRELATION|"
                                  r"COVARIANCE|CHOLESKY|FIXED|FIX)\s+[-+.\d]", re.I)


def _option_hint(text: str) -> str:
    """A hint when a $OMEGA or $SIGMA record writes an option before a single value outside parentheses, which
    pharmpy's parser does not read: the forms of one value that NONMEM's help lists ("init options", "(init
    options)", "(options init)") say the same and are read."""
    for _, record, code in _code_lines(text):
        if record.startswith(("OME", "SIG")) and _OPTION_BEFORE_VALUE.search(code):
            return ("; pharmpy reads an option of one $OMEGA or $SIGMA value written after it or inside its "
                    "parentheses, as NONMEM's help lists them: $OMEGA 0.176 SD or $OMEGA (SD 0.176), not "
                    "$OMEGA SD 0.176")
    return ""


def _nm74_hint(text: str) -> str:
    """A hint when $THETA/$OMEGA/$SIGMA use NONMEM 7.4's forms that pharmpy does not read: labels (CL=(0, 2.8)),
    BLOCK(n) VALUES(diag,odiag) and NAMES(...)."""
    for _, record, code in _code_lines(text):
        if record.startswith(("THE", "OME", "SIG")) and re.search(r"\bVALUES\s*\(|\bNAMES\s*\(|\b[A-Z_]\w*\s*=",
                                                                  code, flags=re.I):
            return ("; hybridpk reads $THETA, $OMEGA and $SIGMA as NONMEM 7.3 writes them: write a label as a comment "
                    "after its value ($THETA (0, 2.8) ; CL) and BLOCK(n) VALUES(diag,odiag) as the block's values "
                    "(BLOCK(2) 0.1 0.01 0.1)")
    return ""


#: NONMEM's $PK names per ADVAN and TRANS (NONMEM help, "ADVAN1" ... "ADVAN12" and "TRANS1" ... "TRANS6"):
#: the micro-constant names of TRANS1 (elimination, then (k_c,p, k_p,c) per peripheral), and the clearance/volume
#: names of TRANS4 (TRANS2 for ADVAN1/2): (CL, central V, ((Q, V) per peripheral))
_MICRO = {1: ("K", ()), 2: ("K", ()), 3: ("K", (("K12", "K21"),)), 4: ("K", (("K23", "K32"),)),
          11: ("K", (("K12", "K21"), ("K13", "K31"))), 12: ("K", (("K23", "K32"), ("K24", "K42")))}
_PHYSIOLOGICAL = {1: ("CL", "V", ()), 2: ("CL", "V", ()), 3: ("CL", "V1", (("Q", "V2"),)),
                  4: ("CL", "V2", (("Q", "V3"),)), 11: ("CL", "V1", (("Q2", "V2"), ("Q3", "V3"))),
                  12: ("CL", "V2", (("Q3", "V3"), ("Q4", "V4")))}
_TRANS = {1: (1, 2), 2: (1, 2), 3: (1, 3, 4, 5, 6), 4: (1, 3, 4, 5, 6), 11: (1, 4), 12: (1, 4)}


def _central_scale(advan: int) -> str:
    return "S2" if advan in (2, 4, 12) else "S1"


def _micro_constants(g, advan, trans):
    """(central volume or None, k10, [(k_cp, k_pc)]) from the $PK variables ``g`` (name -> value or None) as
    ADVANn TRANSm defines them; missing names raise."""
    need = []

    def get(name):
        v = g(name)
        if v is None:
            need.append(name)
        return v

    if trans == 1:
        k, pairs = _MICRO[advan]
        k10, micro = get(k), [(get(a), get(b)) for a, b in pairs]
        vol = None
    elif trans in (2, 4) or (trans == 3 and advan in (3, 4)):
        cl_name, v_name, pairs = _PHYSIOLOGICAL[advan]
        if trans == 2 or (advan == 3 and g("V1") is None and g("V") is not None):
            v_name = "V" if advan in (1, 2, 3) else v_name
        if trans == 3:
            v_name = "V"
        cl, vol = get(cl_name), get(v_name)
        if trans == 3:     # CL, V, Q, VSS: V2 = VSS - V
            q, vss = get("Q"), get("VSS")
            micro = [(q / vol, q / (vss - vol))] if q is not None and vss is not None and vol is not None else []
        else:
            qv = [(get(a), get(b)) for a, b in pairs]
            micro = [(q / vol, q / vp) for q, vp in qv] if vol is not None and None not in sum(qv, ()) else []
        k10 = cl / vol if cl is not None and vol is not None else None
    else:                  # TRANS5 (AOB, ALPHA, BETA) and TRANS6 (ALPHA, BETA, K21), two compartments
        alpha, beta = get("ALPHA"), get("BETA")
        k21 = get("K21") if trans == 6 else None
        if trans == 5:
            aob = get("AOB")
            if None not in (aob, alpha, beta):
                k21 = (aob * beta + alpha) / (aob + 1)
        vol, k10, micro = None, None, []
        if None not in (alpha, beta, k21):
            k10 = alpha * beta / k21
            micro = [(alpha + beta - k21 - k10, k21)]
    if need:
        raise ModelError(f"the $PK does not define what ADVAN{advan} TRANS{trans} needs ({', '.join(need)})")
    return vol, k10, micro


def _structural(env, advan, trans, oral):
    """hybridpk's parameters (CL, V, Q, V2, Q3, V3, KA, F, ALAG) from the $PK variables as NONMEM's ADVANn
    TRANSm reads them: its rate constants (K, K12, K21 ...: from CL/V, Q/V ... with TRANS2-4) with the scale S1/S2
    as the central volume, so that hybridpk's A/V is NONMEM's F = A/S (NONMEM's default S = 1 with TRANS1, 5 and 6:
    F is then the amount). Where S is the kinetic volume (S2 = V) these are the $PK's CL, V ...; where it is not
    (S2 = V/1000), each clearance and volume is scaled by S/V, reported as such (:func:`_scale_labels`)."""
    g = env.get
    _, k10, micro = _micro_constants(g, advan, trans)
    vol = g(_central_scale(advan), 1.0)     # F = A/S: the kinetics' rate constants with S as the central volume
    p = {"V": vol, "CL": k10 * vol}
    for j, (kcp, kpc) in enumerate(micro):
        q = kcp * vol
        p["Q" if j == 0 else "Q3"] = q
        p["V2" if j == 0 else "V3"] = q / kpc
    if oral:
        if g("KA") is None:
            raise ModelError(f"ADVAN{advan} needs KA in $PK")
        p["KA"] = g("KA")
    if g("F1") is not None:
        p["F"] = g("F1")
    if g("ALAG1") is not None:
        p["ALAG"] = g("ALAG1")
    for ours, theirs in (("D", "D1"), ("R", "R1")):     # RATE = -2 (-1): the doses' duration (rate), modelled
        if g(theirs) is not None:
            p[ours] = g(theirs)
    return p


def _stream_names(advan: int) -> dict:
    """{hybridpk's structural parameter: NONMEM's name for it under ADVANn} where they differ: the clearance and
    volume names of TRANS4 (TRANS2 for ADVAN1/2) and the dose compartment's F1 and ALAG1 (ADVAN4's V2 is the
    central volume, hybridpk's V; its V3 the peripheral one, hybridpk's V2)."""
    cl, central, pairs = _PHYSIOLOGICAL[advan]
    ours = {"CL": cl, "V": central, "F": "F1", "ALAG": "ALAG1", "D": "D1", "R": "R1"}
    for (q, v), (our_q, our_v) in zip(pairs, (("Q", "V2"), ("Q3", "V3"))):
        ours.update({our_q: q, our_v: v})
    return {k: v for k, v in ours.items() if k != v}


def _where(text: str, path, record: str) -> str:
    """'FILE line N' of the first record matching ``record`` (a regex such as r'\\$OMEGA'), for messages."""
    for i, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*{record}", line, flags=re.I):
            return f"{Path(path).name} line {i}"
    return Path(path).name


def _code_lines(text: str):
    """(line number, the record it belongs to in upper case ("PK", "DATA", ...), its code without the comment)
    of every line of a control stream."""
    record = ""
    for i, line in enumerate(text.splitlines(), 1):
        head = re.match(r"\s*\$(\w+)", line)
        if head:
            record = head.group(1).upper()
        yield i, record, line.split(";", 1)[0]


def _where_fix(text: str, path) -> str:
    """'FILE line N' of the first FIX inside an $OMEGA or $SIGMA record."""
    for i, record, code in _code_lines(text):
        if record.startswith(("OMEGA", "SIGMA")) and re.search(r"\bFIX", code, flags=re.I):
            return f"{Path(path).name} line {i}"
    return _where(text, path, _OMEGA_OR_SIGMA)


def _mceta(m) -> int:
    """$ESTIMATION MCETA=n: the number of random starting ETAs of each conditional search (0 without it)."""
    for step in m.execution_steps:
        value = {str(k).upper(): v for k, v in (step.tool_options or {}).items()}.get("MCETA")
        if value is not None:
            return int(float(value))
    return 0


def _check_estimation(m, text: str, path) -> tuple[str, bool]:
    """(the estimation method the control stream asks for, whether it asks for evaluation only): "FOCE-I",
    "FOCE", "FO", "LAPLACE-I" or "LAPLACE" (NONMEM's METHOD=1 INTERACTION, METHOD=1, METHOD=0, METHOD=1 LAPLACE
    INTERACTION, METHOD=1 LAPLACE; without $ESTIMATION, FOCE-I), and
    MAXEVAL=0 (the OFV and POSTHOC EBEs at the initial estimates). A method hybridpk does not carry out as
    asked (SAEM, IMP, BAYES, several $ESTIMATION steps) is refused by name."""
    steps = list(m.execution_steps)
    if len(steps) > 1:
        raise ModelError(f"{_where(text, path, _EST)}: {len(steps)} $ESTIMATION steps; hybridpk runs one "
                         "estimation method: keep the one whose results you want")
    for step in steps:
        method = str(step.method).upper()
        if method == "FOCE":
            if step.laplace:
                return ("LAPLACE-I" if step.interaction else "LAPLACE"), bool(step.evaluation)
            return ("FOCE-I" if step.interaction else "FOCE"), bool(step.evaluation)
        if method == "FO" and not step.interaction:
            return "FO", bool(step.evaluation)
        if method == "FO":
            what = "METHOD=0 INTERACTION (not defined for FO)"
        else:
            what = f"METHOD={method}"
        raise ModelError(f"{_where(text, path, _EST)}: $ESTIMATION {what} is not implemented; hybridpk "
                         "estimates by FOCE-I (METHOD=1 INTERACTION), FOCE (METHOD=1), FO (METHOD=0) or Laplace "
                         "(METHOD=1 LAPLACE [INTERACTION]) and does not replace one method by another")
    return "FOCE-I", False


#: records that change the model or its OFV and that hybridpk does not carry out (read as written, each would be
#: left out without a word): {record name: what it asks for}
_UNSUPPORTED_RECORDS = {
    "PRIOR": "a prior on THETA, OMEGA and SIGMA (NWPRI, TNPRI), a term of the OFV",
    "THETAP": "a prior's THETA means (for $PRIOR NWPRI)", "THETAPV": "a prior's THETA variances (for $PRIOR NWPRI)",
    "OMEGAP": "a prior's OMEGA (for $PRIOR NWPRI)", "OMEGAPD": "a prior's OMEGA degrees of freedom (for $PRIOR NWPRI)",
    "SIGMAP": "a prior's SIGMA (for $PRIOR NWPRI)", "SIGMAPD": "a prior's SIGMA degrees of freedom (for $PRIOR NWPRI)",
    "MIX": "a mixture model (subpopulations with their own parameters)",
    "LEVEL": "nested levels of random effects",
}
#: the prior's records, recognised by their full names only ($THETAP begins like $THETA)
_FULL_NAMES_ONLY = ("THETAP", "THETAPV", "OMEGAP", "OMEGAPD", "SIGMAP", "SIGMAPD")
#: $ESTIMATION options that change the OFV and that hybridpk does not carry out
_UNSUPPORTED_OPTIONS = {
    "CENTERING": "the centered FOCE approximation (ETAs centred on their mean)",
    "LIKELIHOOD": "Y as the likelihood of each record, not a prediction (categorical or count data)",
    "-2LOGLIKELIHOOD": "Y as -2 log likelihood of each record, not a prediction",
    "-2LL": "Y as -2 log likelihood of each record, not a prediction",
}
#: $DATA options that change which records are read or what they mean, and that pharmpy reads past: {name: what}
_UNSUPPORTED_DATA_OPTIONS = {
    "RECORDS": "only the first records of the file are read",
    "TRANSLATE": "data items rescaled as they are read (e.g. TIME/24: hours to days)",
    "CHECKOUT": "a check of the data, without estimation",
}


def _abbreviates(word: str, name: str) -> bool:
    """Whether ``word`` names the record or option ``name``: NONMEM takes any initial substring of 3 or more
    letters (NONMEM Users Guide IV, III.A)."""
    return len(word) >= 3 and name.startswith(word)


def _words(code: str) -> list:
    """The upper-case words of a record's code, split at blanks, commas, '=' and parentheses."""
    return [w for w in re.split(r"[\s,=()]+", code.upper()) if w]


def _refuse_unsupported_records(text: str, path) -> None:
    """Refuse, by line, a record, $ESTIMATION option or $DATA option of :data:`_UNSUPPORTED_RECORDS`,
    :data:`_UNSUPPORTED_OPTIONS` and :data:`_UNSUPPORTED_DATA_OPTIONS`, by their names or abbreviations
    (:func:`_abbreviates`; the prior's records by their full names)."""
    where = Path(path).name
    for i, record, code in _code_lines(text):
        head = re.match(r"\s*\$(\w+)", code)
        word = head.group(1).upper() if head else ""
        for name, what in _UNSUPPORTED_RECORDS.items():
            if word and (word == name or (name not in _FULL_NAMES_ONLY and _abbreviates(word, name))):
                raise ModelError(f"{where} line {i}: ${name} ({what}) is not supported; hybridpk would fit the model "
                                 "without it. Remove the record (and the records that go with it) to fit the model "
                                 "as the rest of the control stream writes it")
        if record.startswith(("DAT", "INF")):
            for option, equals in re.findall(r"(?<![\w./\\-])([A-Z]{3,})(?![\w./])(\s*=)?", code.upper()):
                for name, what in _UNSUPPORTED_DATA_OPTIONS.items():
                    if name.startswith(option) and bool(equals) == (name != "CHECKOUT"):
                        raise ModelError(f"{where} line {i}: $DATA {option} ({what}) is not supported; hybridpk "
                                         "would read the data without it")
        if record.startswith("EST"):
            for token in _words(code):
                for name, what in _UNSUPPORTED_OPTIONS.items():
                    if _abbreviates(token, name):
                        raise ModelError(f"{where} line {i}: $ESTIMATION {token} ({what}) is not supported; "
                                         "hybridpk would fit the model without it")


def _covariance_step(text: str) -> str:
    """How $COVARIANCE asks for the standard errors: "sandwich" (NONMEM's default), "R" (MATRIX=R), "S"
    (MATRIX=S), or "none" without a $COVARIANCE record (NONMEM computes none then)."""
    code = "\n".join(line.split(";", 1)[0] for line in text.splitlines())
    rec = re.search(r"^\s*\$COV\w*(.*?)(?=^\s*\$|\Z)", code, flags=re.S | re.M | re.I)
    if not rec:
        return "none"
    matrix = re.search(r"\bMATRIX\s*=\s*([RS])\b", rec.group(1), flags=re.I)
    return matrix.group(1).upper() if matrix else "sandwich"


def _omega(rvs, params, text: str, path):
    """The OMEGA of the control stream as its $OMEGA records define it: (labels (each ETA's variance name),
    initial OMEGA (variances, or the full (K, K) matrix when there are blocks), blocks (groups of correlated
    ETA indices), SAME pairs (block, the block it repeats: ``$OMEGA BLOCK(n) SAME``, inter-occasion
    variability), fixed ETA indices (FIX, which NONMEM applies to a whole block), covariances held at 0 (pairs of
    ETA indices: a banded block, :func:`_band_zeros`))."""
    import sympy

    etas = rvs.etas
    names = list(etas.names)
    labels = [None] * len(names)
    blocks, same, fixed, zeros = [], [], [], []
    first_of = {}     # the block that first used a set of OMEGA parameters (SAME repeats them)
    n_multi = 0       # blocks of several ETAs so far, SAME ones not counted
    for dist in etas:
        b = tuple(names.index(n) for n in dist.names)
        pars = tuple(dist.parameter_names)
        var = dist.variance
        diag = [str(var[i, i]) for i in range(len(b))] if len(b) > 1 else [str(var)]
        for i, e in enumerate(b):
            labels[e] = diag[i]
        if len(b) > 1:
            blocks.append(b)
            n_multi += pars not in first_of
            if not any(params[n].fix for n in pars):    # a FIX block keeps its zeros as every other value
                zeros += _band_zeros(var, params, b, names, n_multi, text, path)
        if pars in first_of:
            same.append((b, first_of[pars]))
            continue
        first_of[pars] = b
        if any(params[n].fix for n in pars):
            zero = [n for n in diag if float(params[n].init) == 0.0]
            if zero:
                raise ModelError(f"{_where_fix(text, path)}: {zero[0]} is 0 FIX (an ETA switched off); remove that "
                                 "ETA from $PK and its $OMEGA record instead: hybridpk estimates only ETAs with a "
                                 "variance")
            fixed += list(b)
    if not blocks and not same:
        return labels, tuple(float(params[n].init) for n in labels), (), (), tuple(fixed), ()
    matrix = etas.covariance_matrix
    k = len(names)
    init = matrix.subs({sympy.Symbol(p.name): p.init for p in params})
    return (labels, tuple(tuple(float(init[i, j]) for j in range(k)) for i in range(k)), tuple(blocks),
            tuple(same), tuple(fixed), tuple(zeros))


def _band_zeros(var, params, block, names, number, text: str, path) -> list:
    """The covariances of an estimated $OMEGA BLOCK given as 0, as pairs of ETA indices (row, column): NONMEM holds
    them at 0 (a banded OMEGA, e.g. ETA(1) with ETA(2) and ETA(2) with ETA(3) but not ETA(1) with ETA(3); nmusers,
    D. Mould, 2001-03-23 "Re: Rounding errors"), whereas pharmpy reads them as covariances to estimate from 0.
    Zeros that do not lead their row (a covariance held at 0 after an estimated one) are refused with the block's
    line: their Cholesky factor is not banded. ``number``: the block's place among the multi-ETA blocks."""
    local = [(i, j) for i in range(len(block)) for j in range(i)
             if var[i, j] == 0 or (str(var[i, j]) in params and float(params[str(var[i, j])].init) == 0.0)]
    out = [(block[i], block[j]) for i, j in local]
    if band_zeros_problem([tuple(block)], out):
        i, j = next((i, j) for i, j in local if any((i, e) not in local for e in range(j)))   # after an estimated
        first, second = (re.sub(r"^ETA_(\d+)$", r"ETA(\1)", names[block[e]]) for e in (j, i))
        raise ModelError(f"{_nth_block_line(text, path, number)}: $OMEGA BLOCK({len(block)}) gives the covariance "
                         f"of {first} and {second} as 0 (held at 0 by NONMEM) after a covariance of the same row that "
                         "is estimated; hybridpk holds covariances at 0 only at the start of a row (a band, e.g. "
                         "BLOCK(3) v11 c21 v22 0 c32 v33). Order the ETAs so that the zeros lead their rows, give "
                         "that covariance a starting value other than 0 to estimate it, or split the block")
    return out


def _nth_block_line(text: str, path, number: int) -> str:
    """'FILE line N' of the ``number``-th $OMEGA BLOCK(n) record (n > 1) that is not SAME (1-based)."""
    seen = 0
    for i, record, code in _code_lines(text):
        if record.startswith("OME") and re.search(r"\$OME\w*\s+BLOCK\s*\(\s*([2-9]|\d\d+)", code, flags=re.I) \
                and not re.search(r"\bSAME\b", code, flags=re.I):
            seen += 1
            if seen == number:
                return f"{Path(path).name} line {i}"
    return _where(text, path, _BLOCK)


#: data items $PK may not read yet (they are not per-record covariates of the batch)
_RECORD_ONLY = ("DV", "AMT", "EVID", "MDV", "CMT", "RATE", "II", "SS", "ADDL", "ID", "DVID", "BLQ", "LLOQ")


def _missing_data(text: str, path, looked) -> str:
    """The message for a $DATA file that is not there: its line, and where pharmpy looked for it (``looked``:
    its datainfo path, relative to the control stream's folder)."""
    named = Path(looked).name if looked is not None else "(none named)"
    return (f"{_where(text, path, r'[$]DATA')}: the data file {named} was not found"
            + (f" (looked for {Path(looked).resolve()})" if looked is not None else "")
            + "; a relative $DATA path is read from the control stream's folder: move the file there or give its "
              "path in $DATA")


def _last20(text: str, path) -> int:
    """$DATA's LAST20=n (0-99: the last two-digit year read as 20nn when dates are translated), else 50."""
    for i, record, code in _code_lines(text):
        found = re.search(r"\bLAST20\s*=\s*(\S+)", code, flags=re.I) if record in ("DATA", "INFILE") else None
        if found:
            value = found.group(1)
            if not (value.isdigit() and 0 <= int(value) <= 99):
                raise ModelError(f"{Path(path).name} line {i}: LAST20={value}: give a two-digit year, 0 to 99 (the "
                                 "last one read as 20nn)")
            return int(value)
    return 50


def _line_of(text: str, path, name: str) -> str:
    """'FILE line N' of the first code line (comments stripped) in $PK/$PRED/$ERROR that mentions ``name``."""
    for i, record, code in _code_lines(text):
        if record.startswith(("PK", "PRED", "ERR")) and re.search(rf"\b{re.escape(name)}\b", code, flags=re.I):
            return f"{Path(path).name} line {i}"
    return Path(path).name


def _theta_labels(m) -> dict:
    """{THETA_n: the name its $THETA comment gives} for the THETAs pharmpy could not name so (the comment is a
    $PK variable's name: ``$THETA (0, 14.9) ; CL``)."""
    names = [n for r in m.internals.control_stream.get_records("THETA") for n in (r.comment_names or [])]
    return {f"THETA_{i}": n for i, n in enumerate(names, 1) if n and f"THETA_{i}" in m.parameters.names}


def _abbreviated(m, text: str, path):
    """pharmpy's model with the labels of $ABBR REPLACE read in the code (NONMEM 7.4: $ABBR REPLACE ETA(CL)=ETA(1),
    then CL = TVCL*EXP(ETA(CL))): NM-TRAN puts the number for the label before anything else; pharmpy names the
    random variable (THETA, EPS) by the label but leaves ETA(CL) in the code a symbol of its own, which hybridpk
    refused as read before it is assigned (a label written as a name, ETA_CL=ETA(1), is pharmpy's name already).
    One label per THETA, ETA or EPS; other forms are refused by line."""
    from pharmpy.basic import Expr

    abbr = m.internals.control_stream.abbreviated
    replace = abbr.replace
    if not replace:
        return m
    named = abbr.translate_to_pharmpy_names()       # {"ETA(1)": "ETA_CL"}
    known = set(m.random_variables.names) | set(m.parameters.names)
    subs = {}
    for label, number in replace.items():
        lab = re.fullmatch(r"(THETA|ETA|EPS)\((\w+)\)|\w+", label.strip(), flags=re.I)   # ETA(CL), or ETA_CL
        num = re.fullmatch(r"(THETA|ETA|EPS)\((\d+)\)", number.strip(), flags=re.I)
        if not lab or not num or (lab.group(1) and lab.group(1).upper() != num.group(1).upper()):
            raise ModelError(f"{_abbr_line(text, path, label)}: $ABBR REPLACE {label}={number}: hybridpk reads one "
                             "label for one THETA, ETA or EPS (ETA(CL)=ETA(1)); write each on its own")
        target = named.get(number)
        if target not in known:
            target = f"{num.group(1).upper()}_{num.group(2)}"
        if target not in known:
            raise ModelError(f"{_abbr_line(text, path, label)}: $ABBR REPLACE {label}={number}: {number} is not in "
                             "the model")
        if label.strip() != target:
            subs[Expr.symbol(label.strip())] = Expr.symbol(target)
    return m.replace(statements=m.statements.subs(subs)) if subs else m


def _abbr_line(text: str, path, label: str) -> str:
    """'FILE line N' of the $ABBR REPLACE of ``label``."""
    return next((f"{Path(path).name} line {i}" for i, record, code in _code_lines(text)
                 if record.startswith("ABB") and label.strip().upper() in code.upper().replace(" ", "")),
                _where(text, path, r"\$ABB"))


#: NONMEM's ICALL while it estimates, predicts and computes tables (help "ICALL": 2, a normal call; 4 while it
#: simulates): code under IF (ICALL.EQ.4) is the simulation step's, not the model's
ESTIMATION_CALL = {"ICALL": 2}


def _only_simulation(text: str, path) -> str:
    """'FILE line N' of a $SIMULATION record with ONLYSIMULATION (any abbreviation of 3 or more letters): NONMEM then
    simulates and does not estimate; else ''."""
    for i, record, code in _code_lines(text):
        if record.startswith("SIM") and any(_abbreviates(w, "ONLYSIMULATION") for w in _words(code)):
            return f"{Path(path).name} line {i}"
    return ""


def _simulation_code(text: str, path) -> str:
    """'FILE line N' of code that NONMEM runs only when it simulates (ICALL.EQ.4, ICALL==4), else ''."""
    for i, record, code in _code_lines(text):
        if record.startswith(("PK", "ERR", "PRED", "DES")) and re.search(r"ICALL\s*(\.EQ\.|==)\s*4\b", code,
                                                                            flags=re.I):
            return f"{Path(path).name} line {i}"
    return ""


#: $PK variables PREDPP reads (NONMEM help "Reserved variables", PREDPP's basic and additional PK parameters): their
#: assignments are the model, whatever else reads them
_PREDPP_NAMES = re.compile(r"(S\d+|SC|F\d+|FO|R\d+|D\d+|ALAG\d+|TLAG\d*|KA|K|K\d+|K\d+T\d+|CL|V|V\d+|VSS|Q|Q\d+|AOB|"
                           r"ALPHA|BETA|VM|KM|CALLFL|MTIME|MTDIFF|MNEXT|MPAST|MNOW|Y|F_FLAG|MDVRES|.*\(.*\))",
                           re.IGNORECASE)


def _live(statements, text: str, pred: bool) -> list:
    """The $PK (or $PRED) statements the model reads: those assigning what PREDPP reads (CL, V, S2, F1, ALAG1, A_0 ...;
    Y in a $PRED), anything $ERROR, $DES or $AES mention, and what these read in turn. The others are left out: a
    time after dose computed for $TABLE (IF (AMT.GT.0) TDOS = TIME ... TAD = TIME - TDOS, whose value NONMEM carries
    from record to record and hybridpk would refuse) changes no prediction; hybridpk writes its own tables."""
    import sympy

    mentioned = set()
    if not pred:
        for _, record, code in _code_lines(text):
            if record.startswith(("ERR", "DES", "AES")):
                mentioned |= {w.upper() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code)}
    needed, kept = set(mentioned), []
    for name, expr in reversed(statements):
        if name.upper() in needed or _PREDPP_NAMES.fullmatch(name):
            kept.append((name, expr))
            needed |= {sym.name.upper() for sym in expr.free_symbols}
            if isinstance(expr, sympy.Piecewise):     # a name kept under IF keeps its earlier assignments too
                needed.add(name.upper())
    return kept[::-1]


def _first_of_subject(statements, data, text: str, path):
    """(statements, data) with each value taken at a subject's first record made a data column: IF (NEWIND.NE.2)
    WT0 = WGT (NONMEM's NEWIND is 0 or 1 at an individual's first record, 2 at the others, and WT0 keeps its value;
    pharmpy writes first(WGT, ID)) reads the column FIRST_WGT, each subject's first record's WGT on every record
    (the records as $DATA's IGNORE/ACCEPT leave them, dose records included, as NONMEM counts them), a covariate
    constant within the subject. Only data items are taken so."""
    import sympy

    from ..data.dataset import FIRST_RECORD

    out, made = [], set()
    for name, expr in statements:
        subs = {}
        for fn in expr.atoms(sympy.Function):
            if str(fn.func) != "first":
                continue
            value, by = fn.args
            if str(by) != "ID" or not isinstance(value, sympy.Symbol) or value.name not in data.columns:
                raise ModelError(f"{_line_of(text, path, name)}: {name} keeps the value of {value} at each subject's "
                                 "first record (NEWIND); hybridpk takes such values of data items only (a column of "
                                 "$INPUT, e.g. IF (NEWIND.NE.2) WT0 = WT)")
            column = f"{FIRST_RECORD}{value.name}"
            while column in data.columns and column not in made:
                column += "_"
            if column not in made:
                data[column] = data.groupby("ID", sort=False)[value.name].transform("first")
                made.add(column)
            subs[fn] = sympy.Symbol(column)
        out.append((name, expr.xreplace(subs) if subs else expr))
    return out, data


def _carried(expr) -> bool:
    """Whether ``expr`` holds pharmpy's forward(value, condition): a variable assigned under an IF without ELSE,
    whose value NONMEM carries from the last record where the condition held (IF (AMT.GT.0) TDOS = TIME)."""
    import sympy

    return any(str(fn.func) == "forward" for fn in expr.atoms(sympy.Function))


def _carried_message(text: str, path, name: str, reader: str) -> str:
    return (f"{_line_of(text, path, name)}: {name} is assigned under an IF without ELSE, so NONMEM carries its value "
            f"from the last record where the condition held (e.g. the time of the last dose), and {reader} reads it; "
            "hybridpk evaluates $PK and $ERROR record by record without that memory. Give the value as a data column "
            "(e.g. TAD, computed when the dataset is built) or assign it on every record")


def _data_items(statements, columns: set, names: set, text: str, path, censoring=None) -> tuple:
    """The data items (dataset columns and TIME) that $PK reads, evaluated at every record as NONMEM does.
    Refused by name and line: items that are not covariates of the records yet (AMT, EVID, CMT ...) and a
    variable read before it is assigned in the record (NONMEM would carry the previous record's value). With
    ``censoring`` (a $PRED's M3), the items its F_FLAG reads (DV, MDV ...) and Y, F_FLAG and MDVRES assigned in its
    IF blocks are the censoring's (:mod:`.nonmem_m3`), not the prediction's."""
    import sympy

    assigned, used = set(), []
    exempt = set(censoring.reads) | set(M3_RESERVED) if censoring is not None else set()
    for name, expr in statements:
        partial = [pw for pw in expr.atoms(sympy.Piecewise) if pw.args[-1][1] != sympy.true]
        if censoring is not None and name in ("Y", "F_FLAG", "MDVRES"):
            partial = []
        if partial:
            cond = partial[0].args[0][1]
            raise ModelError(f"{_line_of(text, path, name)}: {name} is assigned only under IF ({cond}) "
                             "and not before; where the condition is false NONMEM keeps its value from the previous "
                             f"record, which hybridpk does not do: assign {name} first (e.g. {name} = 0)")
        for sym in sorted(expr.free_symbols, key=lambda x: x.name):
            v = sym.name
            if v in assigned or v in names:
                continue
            if v in columns or v == "TIME":
                if v in exempt:
                    continue
                if v in _RECORD_ONLY:
                    raise ModelError(f"{_line_of(text, path, v)}: $PK reads the data item {v}; hybridpk evaluates "
                                     "$PK at every record with covariates and TIME, not yet with "
                                     f"{', '.join(_RECORD_ONLY[:9])}")
                if v not in used:
                    used.append(v)
            elif v != "t" and v not in exempt:
                raise ModelError(f"{_line_of(text, path, v)}: $PK reads {v} before assigning it in the record; "
                                 "NONMEM would carry over its value from the previous record, which hybridpk does "
                                 f"not do: assign {v} on every record (e.g. {v} = 0 first)")
        assigned.add(name)
    return tuple(used)


def _definitions(statements) -> dict:
    """Every $PK variable as an expression of THETAs, ETAs and data items (assignments substituted in order)."""
    import sympy

    defs = {}
    for name, expr in statements:
        defs[name] = expr.subs({sympy.Symbol(k): v for k, v in defs.items()})
    return defs


def _central_scale_alias(statements, scale_name: str, text: str, path):
    """``statements`` with NONMEM's SC, the scale of the central compartment (S1 of ADVAN1 and 3, S2 of ADVAN2 and
    4; NONMEM help, "SC"), written as that S (metrumresearchgroup/bbr's example model writes SC = V); a stream that
    sets both is refused."""
    import sympy

    names = {n for n, _ in statements}
    if "SC" not in names:
        return statements
    if scale_name in names:
        raise ModelError(f"{_line_of(text, path, 'SC')}: $PK sets both SC and {scale_name}, the scale of the same "
                         f"(central) compartment; keep one")
    rename = {sympy.Symbol("SC"): sympy.Symbol(scale_name)}
    return [(scale_name if n == "SC" else n, e.subs(rename)) for n, e in statements]


def _scale_labels(defs: dict, written: dict, advan: int, trans: int, text: str, path) -> dict:
    """How the structural parameters are reported when the central scale S (S1 or S2) is not the kinetic central
    volume V (TRANS2-4; S2 = V/1000 for doses in mg and levels in ng/mL): NONMEM's F = A/S is predicted with the
    kinetics of the $PK's CL, V (Q, peripheral V) as hybridpk's parameters scaled alike, V' = S and each clearance
    and volume times S/V (:func:`_structural`), reported as what they are ("V/1000", "CL/1000"; "CL*S2/V" when
    S/V is not a number). {} when S = V identically (and with TRANS1, 5, 6, whose volume is S). Without S
    (NONMEM's default 1: F is the amount) the stream is refused: levels fitted as amounts are a units slip far
    more often than intended."""
    import sympy

    if trans in (1, 5, 6):
        return {}
    scale_name = _central_scale(advan)
    _, v_name, _ = _PHYSIOLOGICAL[advan]
    if trans in (2, 3) or (advan == 3 and "V1" not in defs):
        v_name = "V" if advan in (1, 2, 3) else v_name
    vol = defs.get(v_name)
    if vol is None:
        return {}       # the ADVAN's own check names what $PK lacks (_micro_constants)
    if scale_name not in defs:
        raise ModelError(f"{Path(path).name}: no {scale_name} (NONMEM's default 1: F is the amount), but the central "
                         f"volume is {v_name}{' = ' + str(written[v_name]) if v_name in written else ''}; write "
                         f"{scale_name} = {v_name} (or {v_name}/1000 for doses in mg and levels in ng/mL)")
    ratio = sympy.simplify(defs[scale_name] / vol)
    if ratio == 1:
        return {}
    if ratio.is_number:
        inverse = sympy.nsimplify(1 / ratio)
        suffix = f"/{inverse}" if inverse.is_Integer else f"*{sympy.nsimplify(ratio)}"
    else:
        suffix = f"*{scale_name}/{v_name}"
    names = {"V": "V", "CL": "CL", "Q": "Q", "V2": "V2", "Q3": "Q3", "V3": "V3"}
    names.update({k: v for k, v in _stream_names(advan).items() if k in names})
    return {ours: f"{theirs}{suffix}" for ours, theirs in names.items()}


def _error_model(m, defs: dict, params, eps_names, sigma_names, scale_name: str, text: str, path,
                 any_scale: bool = False, data=None):
    """(ErrorModel, {"ADD"|"PROP": $SIGMA name}, fixed kinds, factor, censoring) from $ERROR, written on F, IPRED or the
    amount in the observed compartment (A(n) = F * S), with $PK variables substituted: the prediction Y at
    EPS = 0 must be F (times a ``factor`` of $PK variables when ``any_scale``: e.g. IPRED = A(2)/V without S2,
    for a model that divides the amount by any scale), and dY/dEPS (at EPS = 0) 1 (additive) or the
    prediction (proportional), identically. A guard that replaces the prediction where it is 0
    (IF (IPRED.EQ.0) ...) is read as its general branch: hybridpk refuses observations where the model predicts
    0 under a proportional error (:meth:`Problem.require_positive_variance`). A $ERROR that sets F_FLAG (Beal's
    M3 written in the stream) gives the records it censors in ``censoring`` (:mod:`.nonmem_m3`, read on ``data``,
    the stream's data items) and its error model where F_FLAG = 0; else ``censoring`` is None."""
    import sympy

    where = _where(text, path, r"\$ERR")
    after = [(str(st.symbol), sympy.sympify(st.expression).subs(ESTIMATION_CALL)) for st in m.statements.after_odes
             if hasattr(st, "symbol")]
    env = dict(defs)
    fsym = sympy.Symbol("F")
    scale = sympy.Symbol(scale_name)
    amounts = {}
    for name, expr in after:
        if name == "F":       # pharmpy's F = A_CENTRAL(t) / S: the amount is F * S
            for fn in expr.atoms(sympy.Function):
                if str(fn.func).startswith("A_"):
                    amounts[fn] = fsym * scale
            continue
        expr = expr.subs(amounts)
        other = [str(fn.func) for fn in expr.atoms(sympy.Function) if str(fn.func).startswith("A_")]
        if other:
            raise ModelError(f"{where}: $ERROR reads the amount {other[0]} of a compartment other than the observed "
                             "one; hybridpk observes the central compartment")
        if _carried(expr):     # kept from an earlier record: a stand-in, refused below if Y reads it
            env[name] = sympy.Symbol(f"_carried_{name}", real=True)
            continue
        env[name] = _unguard(expr.subs({sympy.Symbol(k): v for k, v in env.items() if k != "F"}), fsym)
    if "Y" not in env:
        raise ModelError(f"{where}: $ERROR does not define Y")
    for sym in env["Y"].free_symbols:
        if sym.name.startswith("_carried_"):
            raise ModelError(_carried_message(text, path, sym.name[len("_carried_"):], "Y"))
    y = env["Y"].subs({scale: defs.get(str(scale), sympy.Integer(1))})
    censoring = None
    if "F_FLAG" in env:     # Y is a likelihood where F_FLAG = 1 (M3): those records are censored
        censoring = read_censoring(env["F_FLAG"], y, data, eps_names, sigma_names, params,
                                   _line_of(text, path, "F_FLAG"))
        y = censoring.y
    zero = {sympy.Symbol(e): 0 for e in eps_names}
    prediction = sympy.simplify(y.subs(zero))
    if prediction.has(sympy.log) and fsym in prediction.free_symbols:    # log-transform-both-sides
        at = next((f"{Path(path).name} line {i}" for i, record, code in _code_lines(text)
                   if record.startswith("ERR") and re.search(r"\bLOG\s*\(", code, flags=re.I)), where)
        return (*_log_error(y, prediction, fsym, eps_names, sigma_names, params, any_scale, at, text, path),
                censoring)
    factor = sympy.simplify(prediction / fsym)
    if fsym in factor.free_symbols or (factor != 1 and not any_scale) or prediction == 0:
        raise ModelError(f"{where}: the prediction (Y at EPS = 0) is {prediction}, not F; "
                         "hybridpk fits Y = F + error, or LOG(F) + error (log-transform-both-sides)")
    return (*_classify_error(y, prediction, fsym, factor, eps_names, sigma_names, params, where, text, path),
            censoring)


def _log_error(y, prediction, fsym, eps_names, sigma_names, params, any_scale, at, text, path):
    """The error model of a log-transform-both-sides $ERROR (DV in log units): Y = LOG(F) + error, as NONMEM
    users write it (IPRED = LOG(F) under a guard: IF (F.GT.0) IPRED = LOG(F) after IPRED = LOG(0.0025), or
    LOG(ABS(F) + 1E-30); Y = IPRED + EPS(1), or IPRED + W*EPS(1) with W = THETA(k) and $SIGMA 1 FIX). Read as
    hybridpk's log-transform-both-sides with ``log_dv`` (the data's DV are read as EXP(DV), so that the fit's
    log(DV) is the stream's DV) and the stream's guard (``ErrorModel.log_guard``): the likelihood of the stream's
    DV, which is NONMEM's OFV. The prediction inside the log must be F (times a factor of $PK variables when
    ``any_scale``) plus a constant >= 0; conditions on F must hold wherever F > 0 (guards); the error terms may not
    read F. AMT is 0 on every record with a level (the data check refuses AMT on an observation record), so that
    DDMoRe's IPRED = LOG(F + FLAG) with FLAG = 1 where AMT.NE.0 is LOG(F) there."""
    import sympy

    on_levels = {sympy.Symbol("AMT"): 0}
    y, prediction = y.subs(on_levels), prediction.subs(on_levels)
    positive = sympy.Symbol("F_POSITIVE", positive=True)
    inner = sympy.simplify(sympy.exp(prediction.subs(fsym, positive)))
    factor = sympy.simplify(sympy.diff(inner, positive))
    offset = sympy.simplify(inner - factor * positive)
    if (positive in factor.free_symbols or offset.free_symbols or not offset.is_nonnegative
            or factor.has(sympy.Piecewise) or (factor != 1 and not any_scale)):
        raise ModelError(f"{at}: the prediction (Y at EPS = 0) is {prediction}; hybridpk imports log-transform-"
                         "both-sides written LOG(F) (guarded where F is 0, or LOG(F + c) with a constant c)")
    at_zero = prediction.subs(fsym, 0)
    guard = (float(offset), float(sympy.exp(at_zero))) if at_zero.is_real and at_zero.is_finite else ()
    error_terms = sympy.simplify(y - prediction)
    if fsym in error_terms.free_symbols:
        raise ModelError(f"{at}: the residual SD reads the prediction on the log scale ({error_terms}); hybridpk "
                         "imports Y = LOG(F) + EPS or + W*EPS with a W of THETAs")
    logf = sympy.Symbol("LOG_F")
    error, kinds, sigma_fixed, _ = _classify_error(logf + error_terms, logf, logf, sympy.Integer(1), eps_names,
                                                   sigma_names, params, at, text, path)
    if "PROP" in kinds:
        raise ModelError(f"{at}: an EPS proportional to LOG(F) is not an error model of log-transform-both-sides; "
                         "write Y = LOG(F) + EPS(1)")
    return replace(error, ltbs=True, log_dv=True, log_guard=guard), kinds, sigma_fixed, factor


def _classify_error(y, prediction, fsym, factor, eps_names, sigma_names, params, where, text, path):
    """The error model of Y (prediction + EPS terms): additive, proportional or combined where each dY/dEPS at
    EPS = 0 is 1 or the prediction, else NONMEM's general form (:func:`_general_error`)."""
    import sympy

    zero = {sympy.Symbol(e): 0 for e in eps_names}
    derivatives = {eps: sympy.simplify(sympy.diff(y, sympy.Symbol(eps)).subs(zero)) for eps in eps_names}
    derivatives = {eps: d for eps, d in derivatives.items() if d != 0}
    if not derivatives:
        raise ModelError(f"{where}: Y has no EPS")
    kinds = {}
    for eps, d in derivatives.items():
        kind = ("ADD" if d.free_symbols == set() and float(d) == 1.0 else
                "PROP" if sympy.simplify(d - prediction) == 0 else None)
        if kind is None or kind in kinds:
            return _general_error(derivatives, fsym, factor, eps_names, sigma_names, params, text, path)
        kinds[kind] = sigma_names[eps_names.index(eps)]
    kind = "combined" if len(kinds) == 2 else ("additive" if "ADD" in kinds else "proportional")
    inits = {k: math.sqrt(float(params[v].init)) for k, v in kinds.items()}
    sigma_fixed = tuple(k for k, v in kinds.items() if params[v].fix)
    zero_fixed = [kinds[k] for k in sigma_fixed if inits[k] == 0.0]
    if zero_fixed:
        raise ModelError(f"{_where_fix(text, path)}: {zero_fixed[0]} is 0 FIX; remove that EPS from $ERROR instead")
    return ErrorModel(kind, add=inits.get("ADD", 0.5), prop=inits.get("PROP", 0.1)), kinds, sigma_fixed, factor


#: data items a general $ERROR may read besides covariate columns (the record's own fields)
_ERROR_ITEMS = ("TIME", "DVID", "CMT")


def _general_error(derivatives, fsym, factor, eps_names, sigma_names, params, text, path):
    """A $ERROR whose dY/dEPS is neither 1 nor the prediction (W = SQRT(THETA(4)**2 + THETA(5)**2*IPRED**2)
    with $SIGMA 1 FIX, ETA on EPS, IF (DVID.EQ.2) ...): NONMEM's general residual variance
    sum_k SIGMA(k) H_k^2 with H_k = dY/dEPS(k) at EPS = 0 (:class:`ErrorModel` "general"), H written in the
    prediction F and the THETAs, ETAs and data items it reads. Returns what :func:`_error_model` returns; the
    data items H reads are in ``ErrorModel.h.reads``."""
    import sympy

    from ._sympy_torch import compile_expression

    where = _where(text, path, r"\$ERR")
    pred = sympy.Symbol("F")
    eps = [e for e in eps_names if e in derivatives]
    # H in the prediction: an IPRED = A(2)/V written on the amount gives F V / V, simplified to F (else H would
    # read V's ETAs, which it does not)
    hs = [sympy.simplify(derivatives[e].xreplace({fsym: pred / factor})) if factor != 1 else derivatives[e]
          for e in eps]
    for e, h in zip(eps, hs):
        if h.has(sympy.core.function.AppliedUndef):
            raise ModelError(f"{where}: the residual error of {e} reads a compartment amount other than through F "
                             f"({h}); write it in terms of F or IPRED")
    names = tuple(f"EPS{eps_names.index(e) + 1}" for e in eps)
    sigmas = {n: sigma_names[eps_names.index(e)] for n, e in zip(names, eps)}
    inits = tuple(math.sqrt(float(params[sigmas[n]].init)) for n in names)
    fixed = tuple(n for n in names if params[sigmas[n]].fix)
    zero_fixed = [sigmas[n] for n, v in zip(names, inits) if v == 0.0 and n in fixed]
    if zero_fixed:
        raise ModelError(f"{_where_fix(text, path)}: {zero_fixed[0]} is 0 FIX; remove that EPS from $ERROR instead")
    compiled = [compile_expression(h) for h in hs]

    def h_of(env):
        return [fn(env) for fn in compiled]

    h_of.reads = tuple(sorted({sym.name for h in hs for sym in h.free_symbols} - {"F"}))
    error = ErrorModel("general", eps=names, sd_init=inits, h=h_of)
    return error, sigmas, fixed, factor


def _unguard(expr, fsym):
    """``expr`` with each Piecewise whose conditions test whether a prediction equals 0 replaced by its general
    (otherwise) branch."""
    import sympy

    def general(pw):
        conds = [c for _, c in pw.args[:-1]]
        if pw.args[-1][1] == sympy.true and all(isinstance(c, sympy.Eq) and 0 in (c.lhs, c.rhs) for c in conds):
            return pw.args[-1][0]
        return pw

    return expr.replace(lambda e: isinstance(e, sympy.Piecewise), general)


def read_control_stream(path):
    """(PopulationModel, Dataset) from a NONMEM control stream and the dataset its $DATA names."""
    import sympy

    from ..data.dataset import read_nonmem

    path = Path(path)
    if not path.is_file():
        raise HybridPKError(f"control stream {path} not found")
    text = _stream_text(path)
    sub = re.search(r"ADVAN(\d+)", text)
    tr = re.search(r"TRANS(\d+)", text)
    pred = not sub and re.search(r"^\s*\$PRED\b", text, flags=re.M | re.I) is not None
    if not sub and not pred:
        raise ModelError(f"{path}: no $SUBROUTINE ADVANn and no $PRED found; hybridpk imports {_SUPPORTED} and "
                         "$PRED")
    advan, trans = (int(sub.group(1)), int(tr.group(1)) if tr else 1) if sub else (0, 0)
    written = advan in _DES_ADVANS + _LINEAR_ADVANS
    if advan not in _ADVAN and not written and not pred:
        raise ModelError(f"{_where(text, path, r'[$]SUB')}: ADVAN{advan} is not supported; hybridpk imports "
                         f"{_SUPPORTED}")
    if not written and not pred and trans not in _TRANS[advan]:
        raise ModelError(f"{_where(text, path, r'[$]SUB')}: ADVAN{advan} TRANS{trans} is not a NONMEM combination "
                         f"(ADVAN{advan} takes TRANS{', TRANS'.join(str(t) for t in _TRANS[advan])})")
    oral = advan in (2, 4, 12)
    _refuse_unsupported_records(text, path)
    comps = _model_record(text, path) if written else None
    m = _abbreviated(_parse_stream(text, path), text, path)
    estimation, evaluation_only = _check_estimation(m, text, path)
    rvs = m.random_variables
    eta_names = list(rvs.etas.names)
    params = m.parameters
    omega_names, omega_init, blocks, same, omega_fixed, omega_zeros = _omega(rvs, params, text, path)
    eps_names = list(rvs.epsilons.names)
    sigma_names = list(rvs.epsilons.variance_parameters)
    if set(rvs.epsilons.parameter_names) != set(sigma_names):
        raise ModelError(f"{_where(text, path, _SIGMA)}: a $SIGMA BLOCK (correlated EPS) is not supported; "
                         "hybridpk estimates independent EPS (one $SIGMA per EPS)")
    special = set(rvs.etas.parameter_names) | set(rvs.epsilons.parameter_names)
    labels = _theta_labels(m)
    thetas = tuple(Theta(p.name, float(p.init), lower=float(p.lower) if p.lower is not None else -math.inf,
                         upper=float(p.upper) if p.upper is not None else math.inf, fixed=bool(p.fix),
                         label=labels.get(p.name, ""))
                   for p in params if p.name not in special)

    statements = _live([(str(s.symbol), sympy.sympify(s.expression).subs(ESTIMATION_CALL))
                        for s in m.statements.before_odes], text, pred)
    for name, expr in statements:
        if _carried(expr):
            raise ModelError(_carried_message(text, path, name, "the model"))
    statements, events = _model_event_times(statements, written, advan, text, path)
    statements = _initial_amounts(statements, written, advan, text, path)
    if m.dataset is None:
        raise HybridPKError(_missing_data(text, path, getattr(m.datainfo, "path", None)))
    data = m.dataset.copy()
    drops = [c.name for c in m.datainfo if c.drop]
    data = data.drop(columns=[c for c in drops if c in data.columns])
    data = _reserved_synonyms(data, m.datainfo)
    statements, data = _first_of_subject(statements, data, text, path)
    statements, once = _call_flag(statements, text, path)
    mceta = _mceta(m)
    simulation = _simulation_code(text, path)
    only_simulation = _only_simulation(text, path)
    recipe = {"kind": "nonmem", "control_stream": str(path.resolve()), "advan": advan, "trans": trans,
              "estimation": estimation, "covariance": _covariance_step(text),
              **({"simulation_code": simulation} if simulation else {}),
              **({"only_simulation": only_simulation} if only_simulation else {}),
              **({"mceta": mceta} if mceta else {}),
              **({"evaluate": True} if evaluation_only else {})}
    common = dict(thetas=thetas, etas=tuple(eta_names), omega_init=omega_init, omega_blocks=blocks,
                  omega_labels=tuple(omega_names), sigma_scale="variance", recipe=recipe, omega_fixed=omega_fixed,
                  omega_same=same, omega_zeros=omega_zeros)
    if pred:
        return _pred_model(statements, data, params, eta_names, eps_names, sigma_names, common, text, path,
                           _data_label(m, path), m.datainfo)
    scanned = statements
    if written:     # the equations are the control stream's own; their data items are read per record too
        pk, structural, read = _written_system(m, statements, comps, advan, text, path, events)
        scanned = statements + [(f"DADT({i})", d) for i, d in enumerate(structural.derivative_expressions, 1)]
    items = _data_items(scanned, set(data.columns), set(params.names) | set(eta_names), text, path)
    covs = tuple(c for c in items if c != "TIME")
    if once:        # CALLFL=1: $PK once per subject, with its first record's data items
        if "TIME" in items:
            raise ModelError(f"{_line_of(text, path, 'CALLFL')}: CALLFL=1 (the $PK once per subject) with a $PK "
                             "that reads TIME is not supported; remove CALLFL=1 or the TIME")
        items = ()
        for c in covs:      # the values $PK sees: each subject's first record's
            data[c] = data.groupby("ID", sort=False)[c].transform("first")
    if written:
        statements = pk
        scale_name = structural.volume_parameter
    else:
        structural = get_model(_ADVAN[advan])
        scale_name = _central_scale(advan)

        def read(env):
            return _structural(env, advan, trans, oral)
    if not written:
        statements = _central_scale_alias(statements, scale_name, text, path)
    defs = _definitions(statements)
    scaled = {} if written else _scale_labels(defs, dict(statements), advan, trans, text, path)
    dose = structural.dose_cmt
    modelled = [f"{what} ({name}{dose})" for name, what in (("D", "duration"), ("R", "rate"))
                if f"{name}{dose}" in defs]
    if modelled:
        common["recipe"] = {**common["recipe"], "modelled_input": modelled}
    error, kinds, sigma_fixed, factor, censoring = _error_model(m, defs, params, eps_names, sigma_names, scale_name,
                                                                text, path, any_scale=written, data=data)
    error_inputs = None
    if error.kind == "general":
        error_items, error_inputs = _error_inputs(error, [t.name for t in thetas], eta_names, set(data.columns),
                                                  text, path)
        covs += tuple(c for c in error_items if c not in covs)
        items += tuple(c for c in error_items if c not in items)      # read at every record
    data = _censored(_data_items_only(data, covs), censoring)
    ds = read_nonmem(data, covariates=list(covs), last20=_last20(text, path), label=_data_label(m, path))
    if error.log_dv:        # Y = LOG(F) + ...: the stream's DV are log concentrations
        ds = ds.dv_from_log()
    run_pk = compile_statements(statements)
    if written:   # F = A(CMT)/S<CMT> on every record, unless $ERROR writes the prediction on one amount
        structural.observes_compartments = factor == 1 and not _error_reads_amounts(m)
    if factor != 1:      # the prediction is A/S times a factor: A over an effective scale S/factor
        of_factor, read_scaled = compile_expression(factor), read

        def read(env):
            p = read_scaled(env)
            p[scale_name] = p.get(scale_name, 1.0) / of_factor(env)
            return p

    def individual(theta, eta, cov):
        # per record (PopulationModel.parameters gives (N, R) data items): ETAs broadcast over the records
        per_record = any(torch.is_tensor(v) and v.dim() == 2 for v in cov.values())
        env = dict(theta)
        env.update({name: (eta[:, k:k + 1] if per_record else eta[:, k]) for k, name in enumerate(eta_names)})
        env.update(cov)
        p = read(run_pk(env))
        n = eta.shape[0]
        return {k: torch.as_tensor(v, dtype=eta.dtype, device=eta.device).expand(n)
                if not torch.is_tensor(v) or v.dim() == 0 else v for k, v in p.items()}

    pm = PopulationModel(structural=structural, error=error, individual=individual, covariates=covs,
                         sigma_labels=dict(kinds), sigma_fixed=sigma_fixed, record_items=items,
                         error_inputs=error_inputs,
                         parameter_labels=({k: f"{k}{dose}" for k in ("F", "ALAG", "D", "R")} if written
                                           else {**_stream_names(advan), **scaled}),
                         concentration_scale=(f"{scale_name} = {dict(statements)[scale_name]}: F = A/{scale_name}"
                                              if scaled else ""),
                         censoring_rule=_rule(censoring, error, m.datainfo), **common)
    return pm, ds


def _pred_model(statements, data, params, eta_names, eps_names, sigma_names, common, text, path, label, datainfo):
    """(PopulationModel, Dataset) of a $PRED control stream: the prediction Y at EPS = 0, computed at every
    record from its data items, THETAs and ETAs (:class:`PredModel`), and the error model of Y."""
    import sympy

    from ..data.dataset import read_nonmem

    where = _where(text, path, r"\$PRED")
    defs = _definitions(statements)
    if "Y" not in defs:
        raise ModelError(f"{where}: $PRED does not define Y")
    y = defs["Y"]
    if y.has(sympy.core.function.AppliedUndef):
        raise ModelError(f"{where}: Y reads a compartment amount; $PRED has no compartments")
    censoring = None
    if "F_FLAG" in defs:    # Beal's M3 (Y a likelihood where F_FLAG = 1): those levels are censored
        censoring = read_censoring(defs["F_FLAG"], y, data, eps_names, sigma_names, params,
                                   _line_of(text, path, "F_FLAG"))
        y = censoring.y
    items = _data_items(statements, set(data.columns), set(params.names) | set(eta_names) | set(eps_names), text,
                        path, censoring)
    prediction = sympy.simplify(y.subs({sympy.Symbol(e): 0 for e in eps_names}))
    error, kinds, sigma_fixed, _ = _classify_error(y, prediction, sympy.Symbol("F"), sympy.Integer(1), eps_names,
                                                   sigma_names, params, where, text, path)
    reads = {sym.name for sym in prediction.free_symbols}
    record_items = tuple(c for c in items if c in reads) or ("TIME",)   # evaluated at every record
    covs = tuple(c for c in record_items if c != "TIME")
    error_inputs = None
    if error.kind == "general":
        error_items, error_inputs = _error_inputs(error, [t.name for t in common["thetas"]], eta_names,
                                                  set(data.columns), text, path)
        covs += tuple(c for c in error_items if c not in covs)
        record_items += tuple(c for c in error_items if c not in record_items)
    data = _censored(_data_items_only(data, covs), censoring)
    ds = read_nonmem(data, covariates=list(covs), last20=_last20(text, path), label=label)
    of_prediction = compile_expression(prediction)

    def individual(theta, eta, cov):
        env = dict(theta)
        env.update({name: eta[:, k:k + 1] for k, name in enumerate(eta_names)})
        env.update(cov)
        value = torch.as_tensor(of_prediction(env), dtype=eta.dtype, device=eta.device)
        return {"IPRED": value if value.dim() else value.expand(eta.shape[0])}

    structural = PredModel("PRED", f"$PRED of {Path(path).name}")
    pm = PopulationModel(structural=structural, error=error, individual=individual, covariates=covs,
                         sigma_labels=dict(kinds), sigma_fixed=sigma_fixed, record_items=record_items,
                         error_inputs=error_inputs, censoring_rule=_rule(censoring, error, datainfo), **common)
    return pm, ds


def _data_items_only(data, covariates):
    """``data`` without the columns hybridpk would give a role NONMEM does not know (BLQ/BQL, LLOQ/LOQ, CENS,
    DUR/D), unless $PK reads them: in a control stream's data they are the stream's data items, which NONMEM
    reads only where the code does (a BLQ column would otherwise censor levels the stream fits)."""
    from ..data._columns import ALIASES

    roles = {alias for role in ("BLQ", "LLOQ", "CENS", "DUR") for alias in ALIASES[role]}
    drop = [c for c in data.columns if str(c).upper() in roles and c not in covariates]
    return data.drop(columns=drop) if drop else data


def _censored(data, censoring):
    """``data`` with the levels the stream's M3 censors marked CENS = 1 (below) or -1 (above), the limit in DV (the
    limit's units are DV's: log units where the stream's DV are logs); the DV these records had are not read."""
    if censoring is None:
        return data
    data = data.copy()
    rows = censoring.cens != 0
    data["CENS"] = censoring.cens.astype(int)
    data.loc[rows, "DV"] = censoring.limit[rows]
    return data


def _rule(censoring, error, datainfo):
    """The stream's M3 as a rule for other data (a patient's levels), on the stream's DV scale and with its $INPUT
    synonyms of reserved data items; None without M3."""
    if censoring is None:
        return None
    synonyms = {c.name: _RESERVED[c.type] for c in datainfo if c.type in _RESERVED and c.name != _RESERVED[c.type]}
    return censoring.rule.for_stream(error.log_dv, synonyms)


def _error_inputs(error, theta_names, eta_names, columns: set, text: str, path):
    """(the covariate columns a general $ERROR reads, a function (theta, eta, batch) -> its environment at every
    record: THETAs, ETAs (N, 1), those columns and TIME, DVID, CMT (N, R))."""
    reads = error.h.reads
    unknown = [r for r in reads if r not in theta_names and r not in eta_names and r not in columns
               and r not in _ERROR_ITEMS]
    if unknown:
        raise ModelError(f"{_line_of(text, path, unknown[0])}: the residual error reads {unknown[0]}, which is "
                         "neither a THETA, an ETA nor a data item")
    items = tuple(r for r in reads if r in columns and r not in _ERROR_ITEMS and r not in theta_names)

    def inputs(theta, eta, batch):
        env = dict(theta)
        env.update({name: eta[:, k:k + 1] for k, name in enumerate(eta_names)})
        for c in items:
            env[c] = batch.cov[..., batch.covariate_names.index(c)]
        dtype = batch.time.dtype
        env.update(TIME=batch.time, DVID=batch.dvid.to(dtype), CMT=batch.cmt.to(dtype))
        return env

    return items, inputs


#: pharmpy's data types of NONMEM's reserved data items (a $INPUT synonym such as DOSE=AMT or CP=DV)
_RESERVED = {"id": "ID", "dv": "DV", "idv": "TIME", "dose": "AMT", "rate": "RATE", "additional": "ADDL", "ii": "II",
             "ss": "SS", "event": "EVID", "mdv": "MDV", "compartment": "CMT"}


def _reserved_synonyms(data, datainfo):
    """``data`` with each reserved data item that $INPUT gives a synonym (``DOSE=AMT``, ``CP=DV``: NONMEM's
    AMT and DV) also under its reserved name, so that the dataset reader knows its role; the label stays for
    the abbreviated code."""
    for column in datainfo:
        reserved = _RESERVED.get(column.type)
        if reserved and column.name != reserved and column.name in data.columns and reserved not in data.columns:
            data[reserved] = data[column.name]
    return data


def _call_flag(statements, text: str, path):
    """($PK statements without CALLFL, whether $PK is called once per subject). NONMEM's CALLFL (help "CALLFL"):
    1 calls $PK once per individual, at its first event record (NONMEM's CONTROL5 reads WT there, '.' on the
    other records); 0, -1 and -2 at every event record, as hybridpk evaluates $PK; others are refused."""
    flags = [float(expr) for name, expr in statements if name == "CALLFL" and expr.is_number]
    rest = [(name, expr) for name, expr in statements if name != "CALLFL"]
    unread = len(flags) != sum(1 for name, _ in statements if name == "CALLFL")
    if unread or any(f not in (1, 0, -1, -2) for f in flags):
        raise ModelError(f"{_line_of(text, path, 'CALLFL')}: CALLFL other than 1 (once per subject) or 0, -1, -2 "
                         "(every record) is not supported")
    return rest, bool(flags) and flags[-1] == 1


def _data_label(m, path) -> str:
    """How dataset messages name the records of a control stream's $DATA (row numbers count the records
    NONMEM reads, after IGNORE and ACCEPT)."""
    data = getattr(m.datainfo, "path", None)
    name = Path(str(data)).name if data is not None else "the data"
    return f"{name} ($DATA of {Path(path).name}; rows are the records kept after IGNORE/ACCEPT)"


def _error_amounts(m) -> list:
    """The compartments (names, sorted) whose amounts $ERROR reads other than through F (IPRED = A(2)/V)."""
    import sympy

    read = set()
    for st in m.statements.after_odes:
        if hasattr(st, "symbol") and str(st.symbol) != "F":
            read |= {str(f.func)[2:] for f in sympy.sympify(st.expression).atoms(sympy.core.function.AppliedUndef)
                     if str(f.func).startswith("A_")}
    return sorted(read)


def _error_reads_amounts(m) -> bool:
    """Whether $ERROR writes the prediction on a compartment's amount (IPRED = A(2)/V) rather than on F."""
    import sympy

    return any(str(st.symbol) != "F" and sympy.sympify(st.expression).atoms(sympy.core.function.AppliedUndef)
               for st in m.statements.after_odes if hasattr(st, "symbol"))


def _model_record(text: str, path) -> list[tuple[str, set]]:
    """The compartments of $MODEL in order (NONMEM's CMT numbers): [(name, attributes such as DEFDOSE)]."""
    code = "\n".join(line.split(";", 1)[0] for line in text.splitlines())
    rec = re.search(r"^\s*\$MODEL?\b(.*?)(?=^\s*\$|\Z)", code, flags=re.S | re.M | re.I)
    where = _where(text, path, r"\$MOD")
    if not rec:
        raise ModelError(f"{Path(path).name}: no $MODEL record; ADVAN5-9, 13-15 need one naming the compartments")
    body = rec.group(1)
    other = re.search(r"\b(NEQ\w*|NCOMP\w*|LINK\w*)\s*=\s*(\w+)", body, flags=re.I)
    if other and not (other.group(1).upper().startswith("NCOMP")):
        raise ModelError(f"{where}: $MODEL {other.group(1).upper()}={other.group(2)} (equilibrium compartments or "
                         "links) is not supported; hybridpk integrates compartments given by COMP=(...)")
    comps = []
    for paren, bare in re.findall(r"\bCOMP\w*\s*=\s*(?:\(([^)]*)\)|(\w+))", body, flags=re.I):
        words = re.split(r"[\s,]+", (paren or bare).strip().strip("'\""))
        comps.append((words[0].strip("'\"").upper(), {w.upper() for w in words[1:]}))
    if not comps:
        raise ModelError(f"{where}: $MODEL names no compartments (COMP=(NAME ...)); hybridpk needs their names")
    off = [name for name, attrs in comps if "INITIALOFF" in attrs]
    if off:
        raise ModelError(f"{where}: compartment {off[0]} is INITIALOFF; hybridpk starts every compartment on")
    return comps


def _initial_amounts(statements, written: bool, advan: int, text: str, path):
    """$PK statements with NONMEM's initial amounts A_0(n) (pharmpy's A_<COMPARTMENT>(0)) named A0_<COMPARTMENT>
    for a model whose equations the stream writes ($DES, ADVAN5/7: its initial state, see :class:`StatementModel`);
    refused for the other ADVANs, whose solutions start from 0."""
    out = []
    for name, expr in statements:
        hit = re.fullmatch(r"A_(\w+)\(0\)", name)
        if hit is None:
            if "(" in name:
                raise ModelError(f"{_line_of(text, path, name.split('(')[0])}: $PK assigns {name}, which hybridpk "
                                 "does not read")
            out.append((name, expr))
            continue
        if not written:
            raise ModelError(f"{_line_of(text, path, 'A_0')}: $PK sets an initial amount (A_0, {name}); hybridpk "
                             f"starts ADVAN{advan}'s compartments at 0: give the amount as a dose record at the first "
                             "time (or write the model with $DES, whose A_0 is read)")
        out.append((f"A0_{hit.group(1)}", expr))
    return out


#: NONMEM's model event times and their flags (help "MTIME"): $PK sets MTIME(n); $PK, $DES and $ERROR read MPAST(n),
#: MNOW and MNEXT
_EVENT_NAMES = re.compile(r"(MTIME|MPAST)\((\d+)\)|MNOW|MNEXT|MTDIFF", re.IGNORECASE)


def _model_event_times(statements, written: bool, advan: int, text: str, path):
    """($PK statements, a substitution for the $DES equations) with NONMEM's model event times carried out (NONMEM
    help "MTIME": PREDPP stops the integration at each MTIME(n) set in $PK; MPAST(n) is 0 before it and 1 from it
    on, so a rate or parameter written on MPAST switches there, as a gallbladder emptying at a meal is usually
    written: ``MTIME(1) = THETA(6)``, ``MTIME(2) = MTIME(1) + 0.5`` and in $DES ``GB = MPAST(1) - MPAST(2)``).

    MTIME(n) becomes the $PK variable MTIME_n and every MPAST(n) the switch T >= MTIME_n on the integration's time,
    so that what reads it moves into $DES and the solver steps to MTIME_n (:meth:`StatementModel.switch_times`).
    MTDIFF (NONMEM's flag that MTIME changes between subjects) is not needed. Refused with their line: model event
    times with an ADVAN whose equations the stream does not write (hybridpk's closed forms do not switch inside
    an interval); MTIME reading TIME; MNOW, MNEXT, and MPAST in $ERROR (a flag at the record's own time)."""
    import sympy

    def line(name: str) -> str:
        for i, record, code in _code_lines(text):
            if record.startswith(("PK", "DES", "ERR", "PRED")) and re.search(rf"\b{re.escape(name)}", code, re.I):
                return f"{Path(path).name} line {i}"
        return Path(path).name

    used = {hit.group(0).upper() for _, record, code in _code_lines(text) if record.startswith(("PK", "DES", "ERR"))
            for hit in _EVENT_NAMES.finditer(code)}
    if not used:
        return statements, {}
    if not written:
        first = sorted(used, key=lambda u: not u.startswith("MTIME"))[0]
        raise ModelError(f"{line(first.split('(')[0])}: {first} (a model event time) with ADVAN{advan}: hybridpk "
                         "switches at model event times in models whose equations the control stream writes "
                         "($DES with ADVAN6 or 13, or ADVAN5/7), not in ADVAN1-4, 11, 12's closed forms; write "
                         "the model with $DES")
    for name in ("MNOW", "MNEXT"):
        if name in used:
            raise ModelError(f"{line(name)}: {name} (the model event at the current time) is not supported; "
                             "hybridpk reads MTIME(n) and MPAST(n)")
    for _, record, code in _code_lines(text):
        hit = re.search(r"MPAST\(\d+\)|MTIME\(\d+\)", code, re.I) if record.startswith("ERR") else None
        if hit:
            raise ModelError(f"{line(hit.group(0).split('(')[0] + '(')}: $ERROR reads {hit.group(0).upper()}; "
                             "hybridpk switches at model event times in $PK and $DES only")
    t = sympy.Symbol(TIME_SYMBOL)
    subs, out, defs = {}, [], {}
    for name, expr in statements:
        expr = expr.xreplace(subs)
        hit = re.fullmatch(r"MTIME\((\d+)\)", name, re.I)
        if name.upper() == "MTDIFF":
            continue
        if hit:
            ours = sympy.Symbol(f"MTIME_{hit.group(1)}")
            reads = {s.name for s in expr.xreplace(defs).free_symbols}
            if reads & {"TIME", TIME_SYMBOL}:
                raise ModelError(f"{line('MTIME')}: {name} reads TIME; hybridpk takes model event times that are "
                                 "fixed for a subject (THETAs, ETAs, covariates)")
            subs[sympy.Symbol(name)] = ours
            subs[sympy.Symbol(f"MPAST({hit.group(1)})")] = sympy.Piecewise((1, t >= ours), (0, True))
            name = ours.name
        defs[sympy.Symbol(name)] = expr
        out.append((name, expr))
    left = sorted({s.name for _, e in out for s in e.free_symbols if _EVENT_NAMES.fullmatch(s.name)})
    if left:
        raise ModelError(f"{line(left[0].split('(')[0])}: {left[0]} is read but its MTIME is not set in $PK")
    return out, subs


def _written_system(m, statements, comps, advan: int, text: str, path, events=None):
    """For ADVAN5-8, 13, 14: ($PK statements, the :class:`StatementModel` of the control stream's own equations,
    a function $PK variables -> its parameters). $DES assignments (those that read T or an amount, directly or
    through another $DES variable) move into the model's right-hand side. ``comps``: :func:`_model_record`;
    ``events``: the substitution of :func:`_model_event_times` for MTIME(n) and MPAST(n) in the equations."""
    import sympy

    names = [c for c, _ in comps]
    ode = m.statements.ode_system
    amount_of = {str(sympy.sympify(a).func): a for a in ode.amounts}
    missing = [n for n in names if f"A_{n}" not in amount_of]
    if missing or len(amount_of) != len(names):
        raise ModelError(f"{_where(text, path, r'[$]MOD')}: pharmpy reads compartments "
                         f"{', '.join(sorted(k[2:] for k in amount_of))} but $MODEL names {', '.join(names)}")
    amounts = [f"A_{n}" for n in names]
    eqs = [sympy.sympify(eq).xreplace(events or {}) for eq in ode.eqs]
    derivative = {str(eq.lhs.args[0].func): eq.rhs for eq in eqs}
    derivatives = [derivative[a] for a in amounts]
    # the $DES part: statements that depend on T or the amounts, or on such a variable, and every assignment of
    # such a variable (GB = 0 before IF (T.GE.TGB) GB = 1)
    t = sympy.Symbol(TIME_SYMBOL)
    des_names, grew = set(), True
    while grew:
        grew = False
        for name, expr in statements:
            reads = {s.name for s in expr.free_symbols}
            reads |= {str(f.func) for f in expr.atoms(sympy.core.function.AppliedUndef)}
            if name not in des_names and (t in expr.free_symbols or reads & (des_names | set(amounts))):
                des_names.add(name)
                grew = True
    pk = [(name, expr) for name, expr in statements if name not in des_names]
    des = [(name, expr) for name, expr in statements if name in des_names]
    reads = set()
    for expr in [e for _, e in des] + derivatives:
        reads |= {s.name for s in expr.free_symbols}
    inputs = sorted(reads - des_names - {TIME_SYMBOL})
    dose = next((i for i, (_, a) in enumerate(comps, 1) if "DEFDOSE" in a), 1)
    obs = next((i for i, (_, a) in enumerate(comps, 1) if "DEFOBS" in a), None)
    if obs is None:     # no DEFOBS: the compartment whose amount $ERROR reads (IPRED = A(2)/V), else the first
        read = _error_amounts(m)
        obs = names.index(read[0]) + 1 if len(read) == 1 and read[0] in names else 1
    assigned = {name for name, _ in pk}
    for name in sorted(assigned):
        hit = re.fullmatch(r"(F|ALAG|R|D)(\d+)", name)
        if hit and int(hit.group(2)) != dose:
            raise ModelError(f"{_line_of(text, path, name)}: {name} (for doses into compartment {hit.group(2)}) is not "
                             f"supported; hybridpk applies F{dose}, ALAG{dose}, D{dose} and R{dose} to doses into the "
                             f"default dose compartment {dose} ({names[dose - 1]})")
    linear = advan in _LINEAR_ADVANS or is_linear(derivatives, des, amounts)
    cls = LinearStatementModel if linear else StatementModel
    how = "general linear" if advan in _LINEAR_ADVANS else "$DES"
    initial = {names.index(name[3:]) + 1: name for name in sorted(assigned) if name[3:] in names
               and name.startswith("A0_")}
    structural = cls(f"ADVAN{advan}", f"{how} model of {Path(path).name}: {', '.join(names)}", names, amounts,
                     dose, obs, inputs, des, derivatives, initial=tuple(sorted(initial)))

    def read(env):
        p = {name: env[name] for name in inputs}
        p.update({f"A_0({k})": env[name] for k, name in initial.items()})
        p.update({s: env[s] if env.get(s) is not None else 1.0 for s in structural.scales})
        for ours, theirs in (("F", f"F{dose}"), ("ALAG", f"ALAG{dose}"), ("D", f"D{dose}"), ("R", f"R{dose}")):
            if env.get(theirs) is not None:
                p[ours] = env[theirs]
        return p

    return pk, structural, read


def write_control_stream(fitted, path) -> Path:
    """Write the control stream a FittedPopulation was imported from with its final estimates as initial
    estimates ($THETA, $OMEGA including block covariances, $SIGMA; FIX, SAME, bounds and everything else as
    the user wrote it), through pharmpy, so the run can be continued or checked in NONMEM. $DATA is rewritten
    relative to the new file. Returns the path written.

    Only imported models (``hybridpk fit run.mod``) can be written back; a model built from options has no
    control stream to start from (refused)."""
    import sympy

    pm = fitted.model
    if pm.recipe.get("kind") != "nonmem":
        raise ModelError("only a model imported from a NONMEM control stream can be written back as one; this "
                         f"model was built by hybridpk ({pm.recipe.get('kind', 'unknown')})")
    _pharmpy()
    from pharmpy.modeling import set_initial_estimates, write_model

    source = Path(pm.recipe["control_stream"])
    if not source.is_file():
        raise HybridPKError(f"the control stream {source} the model was imported from is gone; it is needed to write "
                            "the final estimates back")
    m = _parse_stream(_stream_text(source), source)
    inits = {t.name: float(t.value) for t in fitted.theta if not t.fixed}
    matrix = m.random_variables.etas.covariance_matrix
    omega = fitted.omega.matrix
    for i in range(len(omega)):
        for j in range(i + 1):
            sym = sympy.sympify(matrix[i, j])
            if sym.is_Symbol and not m.parameters[sym.name].fix:
                inits[sym.name] = float(omega[i][j])
    for s in fitted.sigma:
        if s.kind not in pm.sigma_fixed:
            inits[s.label] = float(s.variance)
    m = set_initial_estimates(m, inits)
    out = Path(path)
    write_model(m, str(out), force=True)
    written = _abbreviations_as_written(out.read_text().replace(_SET_ASIDE, ""), _stream_text(source))
    atomic_write_text(out, written)     # the $TABLE and $ABBR records as written
    return out


def _abbreviations_as_written(written: str, original: str) -> str:
    """``written`` (pharmpy's) with the $ABBR records of ``original`` in place of its own: pharmpy rewrites
    $ABBR REPLACE ETA(CL)=ETA(1) as ETA_CL=ETA(1) and drops THETA and EPS labels, which NM-TRAN then refuses."""
    mine = [line for line in original.splitlines() if re.match(r"\s*\$ABB", line, flags=re.I)]
    if not mine:
        return written
    lines = written.splitlines()
    at = next((i for i, line in enumerate(lines) if re.match(r"\s*\$(ABB|PK|PRED)", line, flags=re.I)), len(lines))
    kept = [line for line in lines if not re.match(r"\s*\$ABB", line, flags=re.I)]
    at -= sum(1 for line in lines[:at] if re.match(r"\s*\$ABB", line, flags=re.I))
    return "\n".join(kept[:at] + mine + kept[at:]) + ("\n" if written.endswith("\n") else "")
