"""Warp / WarpTools per-item XML metadata (``<Movie>``, ``<TiltSeries>``): lossless read, typed access, write.

The document is kept as an ``xml.etree.ElementTree`` so unknown elements, attributes and their order survive a round
trip. Values stay Warp's strings until a typed accessor parses them; writers format numbers the way Warp does
(invariant culture, ``True``/``False``). Units are Warp's (defocus in µm, phase shift in π) everywhere in this module
except :func:`ctf_from_params` / :func:`params_from_ctf`, the one place that converts the ``<CTF>`` section to ours.

Layout written by Warp (C# ``XmlTextWriter``, indented with one tab, reproduced by :meth:`WarpMetadata.to_bytes`)::

    <BOM><?xml version="1.0" encoding="utf-8"?>
    <TiltSeries DataDirectory="..." ...>
    \t<Angles>40.01\\n38\\n...</Angles>                    per-tilt list, one value per line
    \t<TiltPS1D ID="0">0|7522.36;0.001953125|2216.87</TiltPS1D>   point list "x|y;x|y"
    \t<CTF>
    \t\t<Param Name="Defocus" Value="2.835209" />      section of Param entries
    \t</CTF>
    \t<GridCTF Width="1" Height="1" Depth="41" MarginX="0" MarginY="0" MarginZ="0">
    \t\t<Node X="0" Y="0" Z="0" Value="2.8969412" />    grid nodes, X fastest, then Y, then Z
    \t</GridCTF>
    </TiltSeries>                                        (no final newline)
"""

from __future__ import annotations

import copy
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MetadataError
from .atomic import write_bytes_atomic

__all__ = [
    "CTF_GRID_FACTORS",
    "GridData",
    "WarpMetadata",
    "ctf_from_params",
    "format_value",
    "params_from_ctf",
    "parse_floats",
    "read_warp_xml",
]

ITEM_KINDS = ("Movie", "TiltSeries")
_DECLARATION = '<?xml version="1.0" encoding="utf-8"?>'
_BOM_UTF8 = b"\xef\xbb\xbf"
_BOM_UTF16 = (b"\xff\xfe", b"\xfe\xff")


# ----------------------------------------------------------------------------------------------------------------------
# values


def format_value(value) -> str:
    """Format a value as Warp writes it (C# invariant culture).

    Parameters
    ----------
    value : bool, int, float, numpy scalar or str
        Booleans become ``True``/``False``; integers plain digits; floats the shortest text that reads back to the
        same number (float32 values as float32), without a trailing ``.0`` and with C#-style exponents (``1E-05``);
        strings pass through.

    Returns
    -------
    str
    """
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return "True" if value else "False"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        # numpy's str() of a float32 is its shortest float32 repr, which is what C# writes for a float
        text = str(value) if isinstance(value, (np.float32, np.float16)) else repr(float(value))
        mantissa, _, exponent = text.partition("e")
        if mantissa.endswith(".0"):
            mantissa = mantissa[:-2]
        return mantissa + ("E" + exponent if exponent else "")
    raise TypeError(f"cannot format {type(value).__name__} for Warp XML: {value!r}")


def parse_floats(text: str | None) -> np.ndarray:
    """Parse Warp's vector strings (``"1, 0, 0, 1"``, ``"5,5,1"``, ``"0.85;-0.02"``, ``"(1, 2)"``) to float64.

    Empty or missing text gives an empty array.
    """
    if not text:
        return np.zeros(0)
    parts = text.strip().strip("()").replace(";", ",").split(",")
    return np.array([float(p) for p in parts if p.strip()], dtype=np.float64)


def _parse_bool(text: str) -> bool | None:
    low = text.strip().lower()
    if low in ("", "null"):  # TiltSeries writes an unset bool? as "", Movie as "null"
        return None
    if low == "true":
        return True
    if low == "false":
        return False
    raise ValueError(f"not a bool: {text!r}")


# ----------------------------------------------------------------------------------------------------------------------
# grids


@dataclass(frozen=True, eq=False)
class GridData:
    """Node values of one of Warp's cubic-spline parameter grids, in napari axis order.

    Parameters
    ----------
    values : numpy.ndarray
        ``(Z, Y, X)`` for Warp's ``CubicGrid`` (``Depth, Height, Width``); ``(W, Z, Y, X)`` for the 4-D
        ``LinearGrid4D`` (``Duration``) used by ``GridVolumeWarp*``. Stored as a read-only float64 copy. Values are in
        the XML's units (e.g. ``GridCTF`` in µm, see :data:`CTF_GRID_FACTORS`).
    margins : tuple of float or None
        ``(MarginZ, MarginY, MarginX)``, fractions of the grid extent (Warp's "centered spacing"); ``None`` for 4-D
        grids, which have no margins.
    """

    values: np.ndarray
    margins: tuple[float, float, float] | None = (0.0, 0.0, 0.0)

    def __post_init__(self):
        values = np.array(self.values, dtype=np.float64)
        if values.ndim not in (3, 4) or 0 in values.shape:
            raise ValueError(f"grid values must be a non-empty 3-D (Z, Y, X) or 4-D (W, Z, Y, X) array, got {values.shape}")
        values.setflags(write=False)
        object.__setattr__(self, "values", values)
        if values.ndim == 4:
            object.__setattr__(self, "margins", None)
        else:
            margins = (0.0, 0.0, 0.0) if self.margins is None else tuple(float(m) for m in self.margins)
            if len(margins) != 3:
                raise ValueError(f"margins must be (z, y, x), got {self.margins!r}")
            object.__setattr__(self, "margins", margins)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def scaled(self, factor: float) -> GridData:
        """A copy with values multiplied by ``factor`` (e.g. ``CTF_GRID_FACTORS["GridCTF"]`` for µm -> Å)."""
        return GridData(self.values * factor, self.margins)


#: Factor from the XML unit of each CTF grid to ours: defocus and its delta µm -> Å, angle deg, phase π -> deg.
CTF_GRID_FACTORS = {"GridCTF": 1e4, "GridCTFDefocusDelta": 1e4, "GridCTFDefocusAngle": 1.0, "GridCTFPhase": 180.0}


# ----------------------------------------------------------------------------------------------------------------------
# CTF section <-> our units

# our key: (Warp Param name, factor from Warp's unit to ours)
_CTF_FIELDS = {
    "pixel_size_a": ("PixelSize", 1.0),
    "defocus_a": ("Defocus", 1e4),  # µm -> Å, positive = under-focus in both
    "defocus_delta_a": ("DefocusDelta", 1e4),  # u - v (not torch-ctf's (u - v) / 2)
    "defocus_angle_deg": ("DefocusAngle", 1.0),
    "phase_shift_deg": ("PhaseShift", 180.0),  # π units -> degrees
    "voltage_kv": ("Voltage", 1.0),
    "cs_mm": ("Cs", 1.0),
    "cc_mm": ("Cc", 1.0),
    "amplitude": ("Amplitude", 1.0),
    "bfactor_a2": ("Bfactor", 1.0),
    "bfactor_delta_a2": ("BfactorDelta", 1.0),
    "bfactor_angle_deg": ("BfactorAngle", 1.0),
    "scale": ("Scale", 1.0),
}


def ctf_from_params(params: Mapping[str, object]) -> dict[str, float]:
    """Convert Warp ``<CTF>`` Param values to our units.

    Parameters
    ----------
    params : mapping
        Warp names to values (strings as read by :meth:`WarpMetadata.get_params`, or numbers).

    Returns
    -------
    dict
        For each Warp parameter present: ``pixel_size_a`` (Å), ``defocus_a`` (Å, positive = under-focus),
        ``defocus_delta_a`` (Å, Warp's DefocusDelta = defocus U - defocus V), ``defocus_angle_deg`` (astigmatism
        angle from the x axis), ``phase_shift_deg``, ``voltage_kv``, ``cs_mm``, ``cc_mm``, ``amplitude`` (amplitude
        contrast fraction), ``bfactor_a2``, ``bfactor_delta_a2``, ``bfactor_angle_deg``, ``scale``. Other Warp
        parameters (Zernike coefficients, distortion, beam tilt, ...) are not converted; read them from ``params``.
    """
    out = {}
    for key, (name, factor) in _CTF_FIELDS.items():
        if name in params:
            try:
                out[key] = float(params[name]) * factor
            except (TypeError, ValueError) as exc:
                raise ValueError(f"CTF parameter {name}={params[name]!r} is not a number") from exc
    return out


def params_from_ctf(ctf: Mapping[str, float]) -> dict[str, str]:
    """Inverse of :func:`ctf_from_params`: our keys and units to Warp ``<CTF>`` Param strings.

    Values are rounded to 15 significant digits (Warp stores these as C# decimals) so unit round trips do not
    leave float noise such as ``2.8352090000000003``. Unknown keys raise ``KeyError``.
    """
    out = {}
    for key, value in ctf.items():
        if key not in _CTF_FIELDS:
            raise KeyError(f"unknown CTF field {key!r}; expected one of {sorted(_CTF_FIELDS)}")
        name, factor = _CTF_FIELDS[key]
        out[name] = format_value(float(f"{float(value) / factor:.15g}"))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the document


class WarpMetadata:
    """One Warp XML document, typed access over an ``ElementTree`` that keeps everything it does not interpret.

    Parameters
    ----------
    root : xml.etree.ElementTree.Element
        The root element (``Movie`` or ``TiltSeries``). Formatting whitespace has been removed (see ``from_bytes``).
    path : path-like, optional
        Where it was read from; used in error messages and as the default target of :meth:`write`.
    declaration, bom, encoding, newline
        How the file looked, so an unchanged document is written back byte for byte.
    """

    def __init__(
        self,
        root: ET.Element,
        *,
        path: str | os.PathLike | None = None,
        declaration: str | None = _DECLARATION,
        bom: bool = True,
        encoding: str = "utf-8",
        newline: str = "\n",
    ):
        self.root = root
        self.path = None if path is None else Path(path)
        self.declaration = declaration
        self.bom = bom
        self.encoding = encoding
        self.newline = newline

    # -- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def new(cls, kind: str, attrs: Mapping[str, object] | None = None) -> WarpMetadata:
        """An empty document with root ``kind`` and the given root attributes, laid out as WarpTools writes it."""
        root = ET.Element(kind, {k: format_value(v) for k, v in (attrs or {}).items()})
        return cls(root)

    @classmethod
    def from_bytes(cls, data: bytes, path: str | os.PathLike | None = None) -> WarpMetadata:
        """Parse a document; raises :class:`MetadataError` if it is not well-formed XML."""
        where = path if path is not None else "<bytes>"
        encoding, bom, body = "utf-8", False, data
        if data.startswith(_BOM_UTF8):
            bom, body = True, data[3:]
        elif data[:2] in _BOM_UTF16:  # older Warp wrote Encoding.Unicode
            encoding, bom = "utf-16", True
        try:
            text_head = data[:400].decode(encoding, errors="replace").lstrip("\ufeff")
        except LookupError:  # pragma: no cover - utf-8/utf-16 always exist
            text_head = ""
        declaration = None
        if text_head.startswith("<?xml"):
            end = text_head.find("?>")
            declaration = text_head[: end + 2] if end > 0 else None
        newline = "\r\n" if "\r\n".encode(encoding if encoding == "utf-8" else "utf-16-le") in body else "\n"
        try:
            parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=False, insert_pis=False))
            parser.feed(data)
            root = parser.close()
        except ET.ParseError as exc:
            raise MetadataError(where, f"malformed XML: {exc}") from None
        _strip_layout(root)
        return cls(root, path=path, declaration=declaration, bom=bom, encoding=encoding, newline=newline)

    def copy(self) -> WarpMetadata:
        return WarpMetadata(
            copy.deepcopy(self.root),
            path=self.path,
            declaration=self.declaration,
            bom=self.bom,
            encoding=self.encoding,
            newline=self.newline,
        )

    # -- root ------------------------------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """Root tag: ``"Movie"`` or ``"TiltSeries"``."""
        return self.root.tag

    @property
    def attrs(self) -> dict[str, str]:
        """The root attributes as Warp's strings (live: edits change the document)."""
        return self.root.attrib

    def get_attr(self, name: str, default: str | None = None) -> str | None:
        return self.root.get(name, default)

    def set_attr(self, name: str, value) -> None:
        """Set a root attribute, formatted by :func:`format_value`.

        ``None`` (an unset ``bool?`` such as ``UnselectManual``) is written as Warp does: ``null`` in a Movie, ``""``
        in a TiltSeries; Warp reads both back as unset.
        """
        if value is None:
            self.root.set(name, "" if self.kind == "TiltSeries" else "null")
        else:
            self.root.set(name, format_value(value))

    def get_float(self, name: str, default: float | None = None) -> float | None:
        return self._typed(name, default, float, "number")

    def get_int(self, name: str, default: int | None = None) -> int | None:
        return self._typed(name, default, int, "integer")

    def get_bool(self, name: str, default: bool | None = None) -> bool | None:
        """``True``/``False`` (any case); ``""`` and ``"null"`` (an unset ``bool?``) give ``None``."""
        return self._typed(name, default, _parse_bool, "bool")

    def get_floats(self, name: str) -> np.ndarray:
        """A vector attribute such as ``PlaneNormal`` or ``MagnificationCorrection`` (row-major 2x2)."""
        if name not in self.root.attrib:
            raise KeyError(f"{self._where}: no attribute {name!r} on <{self.kind}>")
        return self._typed(name, None, parse_floats, "list of numbers")

    def _typed(self, name, default, parse, what):
        text = self.root.get(name)
        if text is None:
            return default
        try:
            return parse(text)
        except ValueError:
            raise MetadataError(self._where, f"attribute {name}={text!r} is not a {what}") from None

    # -- elements --------------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Tags of the root's children, in document order (repeated ones, e.g. ``TiltPS1D``, repeated)."""
        return [child.tag for child in self.root]

    def has(self, name: str, id: int | None = None) -> bool:
        return self._find(name, id) is not None

    def element(self, name: str, id: int | None = None) -> ET.Element:
        """The first child ``<name>`` (with ``ID="id"`` if given); ``KeyError`` if absent."""
        el = self._find(name, id)
        if el is None:
            which = f'<{name} ID="{id}">' if id is not None else f"<{name}>"
            raise KeyError(f"{self._where}: no {which} in <{self.kind}>")
        return el

    def remove(self, name: str, id: int | None = None) -> None:
        self.root.remove(self.element(name, id))

    def _find(self, name, id=None):
        for child in self.root:
            if child.tag == name and (id is None or child.get("ID") == str(id)):
                return child
        return None

    def _ensure(self, name, id=None):
        el = self._find(name, id)
        if el is None:
            el = ET.SubElement(self.root, name, {} if id is None else {"ID": str(id)})
        return el

    # -- Param sections (<CTF>, <OptionsCTF>, <OptionsMovement>, ...) ------------------------------------------------

    def get_params(self, section: str) -> dict[str, str]:
        """``{Name: Value}`` of the ``<Param>`` entries of ``<section>``, in document order."""
        return {p.get("Name"): p.get("Value", "") for p in self.element(section) if p.tag == "Param"}

    def set_params(self, section: str, params: Mapping[str, object]) -> None:
        """Update ``<section>`` (created if absent): existing Params change value in place, new ones are appended.

        Params not named in ``params`` are kept. Values are formatted by :func:`format_value`.
        """
        el = self._ensure(section)
        existing = {p.get("Name"): p for p in el if p.tag == "Param"}
        for name, value in params.items():
            text = format_value(value)
            if name in existing:
                existing[name].set("Value", text)
            else:
                ET.SubElement(el, "Param", {"Name": name, "Value": text})

    # -- grids -------------------------------------------------------------------------------------------------------

    def get_grid(self, name: str) -> GridData:
        """Read grid ``<name>`` (e.g. ``GridCTF``, ``GridMovementX``, ``GridLocalMovementY``) into :class:`GridData`."""
        el = self.element(name)
        try:
            is4d = "Duration" in el.attrib
            dims = [int(el.get(k, "1")) for k in ("Width", "Height", "Depth", "Duration")[: 4 if is4d else 3]]
            nodes = [n for n in el if n.tag == "Node"]
            keys = ("X", "Y", "Z", "W")[: len(dims)]
            idx = np.array([[int(n.get(k, "0")) for k in keys] for n in nodes], dtype=np.int64).reshape(-1, len(dims))
            vals = np.array([float(n.get("Value")) for n in nodes], dtype=np.float64)
            margins = None if is4d else tuple(float(el.get(k, "0")) for k in ("MarginZ", "MarginY", "MarginX"))
        except (TypeError, ValueError) as exc:
            raise MetadataError(self._where, f"<{name}>: bad grid attribute or node: {exc}") from None
        if min(dims) < 1 or len(nodes) != math.prod(dims):
            raise MetadataError(self._where, f"<{name}>: {len(nodes)} nodes for a {'x'.join(map(str, dims))} grid")
        if (idx < 0).any() or (idx >= np.array(dims)).any():
            raise MetadataError(self._where, f"<{name}>: node index outside the {'x'.join(map(str, dims))} grid")
        values = np.full(dims[::-1], np.nan)
        values[tuple(idx[:, ::-1].T)] = vals  # file indices are (x, y, z[, w]); arrays are (..., z, y, x)
        if np.isnan(values).sum() > np.isnan(vals).sum():
            raise MetadataError(self._where, f"<{name}>: duplicate nodes leave part of the grid unset")
        return GridData(values, margins)

    def set_grid(self, name: str, grid: GridData) -> None:
        """Write ``grid`` as ``<name>``, replacing its nodes in place (or appending the element) in Warp's layout."""
        el = self._ensure(name)
        el.attrib.clear()
        el.text = None
        for child in list(el):
            el.remove(child)
        values = grid.values
        dims = values.shape[::-1]  # (X, Y, Z[, W])
        for key, n in zip(("Width", "Height", "Depth", "Duration"), dims):
            el.set(key, str(n))
        if grid.margins is not None:
            for key, m in zip(("MarginX", "MarginY", "MarginZ"), grid.margins[::-1]):
                el.set(key, format_value(m))
        keys = ("X", "Y", "Z", "W")[: values.ndim]
        for index in np.ndindex(*values.shape):  # C order: x fastest, as Warp writes
            attrib = {k: str(i) for k, i in zip(keys, index[::-1])}
            attrib["Value"] = format_value(float(values[index]))
            ET.SubElement(el, "Node", attrib)

    # -- per-tilt lists (<Angles>, <Dose>, <UseTilt>, <AxisAngle>, <AxisOffsetX>, <MoviePath>, ...) ------------------

    def get_list(self, name: str, dtype: type = float):
        """One value per line of ``<name>``.

        Parameters
        ----------
        dtype : type
            ``float`` or ``int`` -> numpy array; ``bool`` -> numpy bool array (``UseTilt``); ``str`` -> list of str
            (``MoviePath``).
        """
        lines = [t.strip() for t in (self.element(name).text or "").split("\n")]
        lines = [t for t in lines if t]
        if dtype is str:
            return lines
        parse = {float: float, int: int, bool: _parse_bool}.get(dtype)
        if parse is None:
            raise TypeError(f"dtype must be float, int, bool or str, not {dtype!r}")
        try:
            return np.array([parse(t) for t in lines], dtype=dtype)
        except (TypeError, ValueError):
            raise MetadataError(self._where, f"<{name}> is not a list of {dtype.__name__}") from None

    def set_list(self, name: str, values: Iterable) -> None:
        """Write ``values`` one per line into ``<name>`` (created if absent)."""
        el = self._ensure(name)
        el.text = "\n".join(format_value(v) for v in _scalars(values))

    # -- point lists (<PS1D>, <SimulatedScale>, <SimulatedBackground>, <TiltPS1D ID=..>, ...) -------------------------

    def get_points(self, name: str, id: int | None = None) -> np.ndarray:
        """``"x|y;x|y;..."`` of ``<name>`` (with ``ID="id"`` for per-tilt ones) as an ``(N, 2)`` array of (x, y).

        For PS1D, x is spatial frequency in cycles per pixel of the CTF pixel size (0..0.5) and y the
        background-subtracted power; for SimulatedScale/SimulatedBackground they are the knots of Warp's 1-D cubic
        spline (``Cubic1D``).
        """
        text = (self.element(name, id).text or "").strip()
        if not text:
            return np.zeros((0, 2))
        try:
            pts = [pair.split("|") for pair in text.split(";") if pair.strip()]
            return np.array([[float(x), float(y)] for x, y in pts], dtype=np.float64).reshape(-1, 2)
        except ValueError:
            raise MetadataError(self._where, f"<{name}> is not a list of x|y pairs") from None

    def set_points(self, name: str, points, id: int | None = None) -> None:
        """Write an ``(N, 2)`` array of (x, y) as ``"x|y;..."`` into ``<name>`` (with ``ID`` if given)."""
        pts = np.asarray(points)
        if pts.ndim != 2 or pts.shape[1] != 2:
            raise ValueError(f"points must be (N, 2), got {pts.shape}")
        el = self._ensure(name, id)
        el.text = ";".join(f"{format_value(x)}|{format_value(y)}" for x, y in pts.tolist())

    # -- output ------------------------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Serialise in Warp's layout (tab indentation, ``" />"``, BOM and declaration as read, no final newline)."""
        out: list[str] = []
        if self.declaration:
            out.append(self.declaration + self.newline)
        _serialise(self.root, 0, out, self.newline)
        text = "".join(out)
        if self.encoding == "utf-8":
            return (_BOM_UTF8 if self.bom else b"") + text.encode("utf-8")
        return (b"\xff\xfe" if self.bom else b"") + text.encode("utf-16-le")

    def write(self, path: str | os.PathLike | None = None) -> Path:
        """Write atomically to ``path`` (default: where it was read from) and return the path."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("no path given and the document was not read from a file")
        write_bytes_atomic(target, self.to_bytes())
        return target

    @property
    def _where(self) -> str:
        return str(self.path) if self.path is not None else f"<{self.kind} XML>"

    def __repr__(self) -> str:
        return f"WarpMetadata(kind={self.kind!r}, path={str(self.path) if self.path else None!r}, {len(self.root)} elements)"


def read_warp_xml(path: str | os.PathLike, kinds: Iterable[str] | None = ITEM_KINDS) -> WarpMetadata:
    """Read a Warp item XML.

    Parameters
    ----------
    path : path-like
    kinds : iterable of str or None
        Accepted root tags (default ``Movie`` and ``TiltSeries``); ``None`` accepts any.

    Raises
    ------
    FileNotFoundError
        The file does not exist (an unprocessed item, not a broken one).
    MetadataError
        Malformed XML, or an unexpected root tag.
    """
    path = Path(path)
    meta = WarpMetadata.from_bytes(path.read_bytes(), path=path)
    if kinds is not None and meta.kind not in tuple(kinds):
        raise MetadataError(path, f"root element <{meta.kind}>, expected one of {', '.join(kinds)}")
    return meta


# ----------------------------------------------------------------------------------------------------------------------
# layout helpers


def _scalars(values):
    if isinstance(values, np.ndarray):
        return [v for v in values.ravel()]  # keep numpy scalar types (float32 formats as float32)
    return list(values)


def _strip_layout(el: ET.Element) -> None:
    """Drop indentation whitespace so the tree holds only content (Warp never writes mixed content)."""
    if len(el) and el.text is not None and not el.text.strip():
        el.text = None
    for child in el:
        if child.tail is not None and not child.tail.strip():
            child.tail = None
        _strip_layout(child)


def _esc_text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _esc_attr(s: str) -> str:
    # newlines/tabs as character references, or a parser would fold them to spaces
    return (
        _esc_text(s).replace('"', "&quot;").replace("\r", "&#xD;").replace("\n", "&#xA;").replace("\t", "&#x9;")
    )


def _serialise(el: ET.Element, depth: int, out: list[str], newline: str) -> None:
    indent = "\t" * depth
    attrs = "".join(f' {k}="{_esc_attr(v)}"' for k, v in el.attrib.items())
    out.append(f"<{el.tag}{attrs}")
    if len(el) == 0:
        # XmlTextWriter: no content -> "<a />"; content written with WriteString, even "", -> "<a>...</a>"
        out.append(" />" if el.text is None else f">{_esc_text(el.text)}</{el.tag}>")
        return
    out.append(">")
    if el.text:
        out.append(_esc_text(el.text))
    for child in el:
        out.append(newline + indent + "\t")
        _serialise(child, depth + 1, out, newline)
        if child.tail:
            out.append(_esc_text(child.tail))
    out.append(f"{newline}{indent}</{el.tag}>")
